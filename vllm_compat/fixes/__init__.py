"""One module per fix; importing this package registers them. Fixes are applied in this
order (bf16_params and support build on logprobs, so they come after it)."""
from . import defaults  # noqa: F401  isort: skip
from . import lm_head  # noqa: F401  isort: skip
from . import logprobs  # noqa: F401  isort: skip
from . import prompt_logprobs  # noqa: F401  isort: skip
from . import bf16_params  # noqa: F401  isort: skip
from . import support  # noqa: F401  isort: skip
from . import weights  # noqa: F401  isort: skip
