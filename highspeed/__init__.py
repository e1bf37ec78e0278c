"""highspeed: a fast inference engine and server for Mixture-of-Experts language models."""
from highspeed.outputs import CompletionOutput, RequestOutput, Usage
from highspeed.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Usage"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Import the engine lazily: `import highspeed` stays cheap for the CLI and the server's workers.
    if name == "LLM":
        from highspeed.llm import LLM

        return LLM
    raise AttributeError(name)
