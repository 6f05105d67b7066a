"""Upper bounds on what one HTTP request may ask for, checked before anything is allocated.

Each bounds a factor of a request's work or memory (sequences, prompts, stop checks per
token, tools rendered into the prompt). The body itself is capped by the app's guard
(`MAX_BODY_BYTES`), which also bounds every list and string here from above.
"""

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_N = 64  # n and best_of (SamplingParams caps best_of at the same value)
MAX_PROMPTS = 256  # prompts in one completions request
MAX_EMBED_INPUTS = 2048  # inputs in one embeddings request (OpenAI's limit)
MAX_SEQUENCES = 256  # prompts x sequences per prompt: the engine requests one HTTP request may start
MAX_LOGPROBS = 20  # logprobs / top_logprobs / prompt_logprobs alternatives per token
MAX_STOPS = 16  # stop strings
MAX_STOP_CHARS = 1024  # characters in one stop string
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # logit_bias entries
MAX_CHOICES = 1024  # guided_choice options
MAX_TOOLS = 128
MAX_MESSAGES = 4096
MAX_NAME_CHARS = 256  # model, cache_salt, session_id
MAX_TOKENS = 2**31 - 1  # max_tokens, min_tokens: far above any context; keeps them machine integers
