"""Start llama-cpp-python's OpenAI-compatible server as a benchmark peer.

    .venv/bin/python benchmarks/llama_cpp_server.py MODEL.gguf PORT

Same workaround as benchmarks/common.py: llama.cpp's extra (AMX) buffer types crash in
this VM, so they are switched off before the model loads. Needs the server extras:
    .venv/bin/pip install sse-starlette starlette-context pydantic-settings
"""

import sys
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import disable_llama_cpp_extra_bufts

disable_llama_cpp_extra_bufts()

from llama_cpp.server.app import create_app
from llama_cpp.server.settings import ModelSettings, ServerSettings

model, port = sys.argv[1], int(sys.argv[2])
# interrupt_requests=False: by default a new request cuts off the streams in flight.
app = create_app(server_settings=ServerSettings(host="127.0.0.1", port=port, interrupt_requests=False),
                 model_settings=[ModelSettings(model=model, model_alias="smollm2-135m", n_ctx=4096,
                                               n_threads=2, n_batch=512, verbose=False)])
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
