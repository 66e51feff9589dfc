"""Tools, not runtime: the golden V0 fixtures and ``vllm-compat verify`` (fixtures, scenarios, the
scenario runner, the trainer reference, the judge and its plot). Imported only by the command line
and the tests, never by ``import vllm_compat``."""
