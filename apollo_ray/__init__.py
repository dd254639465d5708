"""apollo-ray: multilingual medical LLMs the Apollo way, on Ray.

Importing the package registers the Post-MoE architecture with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(path)`` loads an upcycled checkpoint without ``trust_remote_code``.
"""

__version__ = "0.1.0"


def _register() -> None:
    try:
        from apollo_ray.model import post_moe  # noqa: F401  (registers on import)
    except ImportError:  # the model file is optional until torch/transformers are installed
        pass


_register()
