"""Tools, not runtime: the ``vllm-compat`` command (cli), ``bench`` and the patch series tooling.
Imported only by the command line and the tests, never by ``import vllm_compat``."""
