"""One module per fix; importing this package registers them (in this order)."""
from . import defaults, lm_head, logprobs, prompt_logprobs  # noqa: F401
