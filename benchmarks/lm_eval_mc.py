"""lm-eval against `tierlm serve`: a local multiple-choice task, checked against the engine.

    .venv/bin/pip install 'lm-eval[api]'
    .venv/bin/python benchmarks/lm_eval_mc.py [--model smollm2-135m]

Runs lm-eval's `local-completions` model (its log-likelihood path: token-id prompts with
`echo`, `logprobs: 1`, `max_tokens: 1`) on benchmarks/data/mc_questions.jsonl (12
questions, 4 choices) against a `tierlm serve` it starts, with `--log_samples`. Then it
recomputes every (context, continuation) log-likelihood with the engine's own scoring
(one forward over lm-eval's exact token ids, log-softmax, sum over the continuation) in
this process, and records accuracy and the largest difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import record
from benchmarks.serve_bench import free_port, start

DATA = Path(__file__).with_name("data") / "mc_questions.jsonl"
TASK = "tierlm_mc"


def write_task(folder: Path) -> None:
    (folder / f"{TASK}.yaml").write_text(textwrap.dedent(f"""\
        task: {TASK}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {DATA}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: answer
        target_delimiter: " "
        metric_list:
          - metric: acc
    """))


def write_hf_tokenizer(tokenizer, folder: Path) -> None:
    """Our tokenizer as a transformers-loadable folder, so lm-eval tokenizes exactly as the server."""
    (folder / "tokenizer.json").write_text(tokenizer.backend_json())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    import lm_eval
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    from tierlm.llm import LLM

    llm = LLM(args.model)
    work = Path(tempfile.mkdtemp(prefix="tierlm-lmeval-"))
    write_task(work)
    write_hf_tokenizer(llm.engine.tokenizer, work)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start([sys.executable, "-m", "tierlm.cli", "serve", "--model", args.model, "--port", str(port)],
                   url, "/ready")
    try:
        lm = LocalCompletionsAPI(model=args.model, base_url=f"{url}/v1/completions", tokenizer=str(work),
                                 tokenizer_backend="huggingface", num_concurrent=1, max_retries=1)
        res = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(work)),
                                      log_samples=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    worst, n = 0.0, 0
    for sample in res["samples"][TASK]:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            ctx, cont = lm._encode_pair(context, continuation)
            ids = ctx + cont
            lps = torch.log_softmax(llm.engine.prompt_logits(ids).float(), dim=-1)
            ours = sum(lps[p - 1, ids[p]].item() for p in range(len(ctx), len(ids)))
            worst = max(worst, abs(ours - resp[0][0]))
            n += 1
    acc = res["results"][TASK]["acc,none"]
    print(f"acc {acc:.4f} over {len(res['samples'][TASK])} questions; {n} log-likelihoods, "
          f"max |lm-eval - engine| = {worst:.3g}")
    record("lm_eval_mc", "python benchmarks/lm_eval_mc.py", {
        "model": args.model, "task": TASK, "questions": len(res["samples"][TASK]), "acc": acc,
        "loglikelihoods_compared": n, "max_abs_difference": worst})


if __name__ == "__main__":
    main()
