"""GPT-OSS's format through a real vLLM server: a tiny dense model carrying GPT-OSS's real tokenizer, chat template
and generation config (vLLM's CPU build has no LoRA for MoE), so vLLM samples over the real vocabulary with the
stack's requests and stops at harmony's stop tokens; then GRPO steps whose completions have a known structure
(written into the server's answers by the proxy: a random model writes no harmony) show the rewards scoring the
final channel and the step's metrics counting the rest."""

from __future__ import annotations

import json
import re

import pytest

from conftest import API_KEY, run_trainer, start_server, trainer_env
from fault_proxy import FaultProxy
from scripts.random_models import save_tiny_harmony
from test_training_server import metrics
from trainer.data import load_prompts, prompt_token_ids
from trainer.harmony import pin_prompt_template
from trainer.model import load_tokenizer
from trainer.vllm_client import VLLMServerClient

pytestmark = pytest.mark.server

STOPS = [200002, 199999, 200012]  # <|return|>, <|endoftext|>, <|call|>: the generation config's, TRL's EOS list


@pytest.fixture(scope="module")
def harmony_model(gpt_oss_tokenizer_dir, tmp_path_factory):
    return save_tiny_harmony(tmp_path_factory.mktemp("models") / "tiny-harmony", gpt_oss_tokenizer_dir)


@pytest.fixture(scope="module")
def harmony_server(harmony_model, tmp_path_factory):
    server = start_server(harmony_model, tmp_path_factory.mktemp("vllm") / "vllm.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tokenizer(harmony_model):
    return load_tokenizer(str(harmony_model))


def test_vllm_samples_real_token_ids_and_stops_at_harmonys_stop_tokens(harmony_server, harmony_model, tokenizer):
    pinned = load_tokenizer(str(harmony_model))
    assert pin_prompt_template(pinned, "2026-12-07")
    prompt = prompt_token_ids(pinned, [{"role": "user", "content": "What is 3 + 4?"}], {})
    completions = VLLMServerClient(harmony_server.url, API_KEY).complete(
        str(harmony_model), [prompt], n=32, max_tokens=48, temperature=1.0, top_p=1.0, stop_token_ids=STOPS)
    stopped = [c for c in completions if c.finish_reason == "stop"]
    assert stopped and len(stopped) < len(completions), [c.finish_reason for c in completions]
    assert all(c.token_ids[-1] in STOPS and not set(c.token_ids[:-1]) & set(STOPS) for c in stopped)
    assert all(len(c.token_ids) == 48 and not set(c.token_ids) & set(STOPS)
               for c in completions if c.finish_reason == "length")
    assert max(t for c in completions for t in c.token_ids) > 100_000  # the whole vocabulary, not a toy one
    assert {c.token_ids[-1] for c in stopped} <= {200002, 200012}  # the two the model gives mass to


def known_structure(solution: str) -> list[str]:
    """A group of four completions of known structure for a problem whose answer is `solution`."""
    wrong = str(int(solution) + 1)
    return [
        f"<|channel|>analysis<|message|>Not \\boxed{{{wrong}}}: {solution}.<|end|>"
        f"<|start|>assistant<|channel|>final<|message|>\\boxed{{{solution}}}<|return|>",  # right
        f"<|channel|>analysis<|message|>It is {solution}.<|end|>"
        f"<|start|>assistant<|channel|>final<|message|>\\boxed{{{wrong}}}<|return|>",  # reasoned right, answered wrong
        f"<|channel|>analysis<|message|>So far {solution}, and",  # cut inside its reasoning
    ]  # the fourth stays what the model sampled


def test_grpo_steps_score_the_final_channel_and_count_the_rest(harmony_server, harmony_model, tokenizer, tmp_path):
    solutions = {row["prompt"][-1]["content"]: row["solution"] for row in load_prompts("sample", "", "train", "")}
    solutions.update({row["prompt"][-1]["content"]: row["solution"] for row in load_prompts("sample", "", "test", "")})
    requests = []

    def rewrite(path, body, answer):
        if path != "/v1/completions":
            return answer
        requests.append(body)
        n = body["n"]
        for choice in answer["choices"]:
            prompt_text = tokenizer.decode(body["prompt"][choice["index"] // n])
            question = re.search(r"<\|start\|>user<\|message\|>(.*?)<\|end\|>", prompt_text, re.S).group(1)
            group = known_structure(solutions[question])
            kind = choice["index"] % n if n > 1 else 0  # evaluation (n=1): every answer right
            if kind < len(group):
                ids = tokenizer.encode(group[kind], add_special_tokens=False)
                choice["token_ids"] = ids
                choice["logprobs"]["token_logprobs"] = [-1.0] * len(ids)
                choice["finish_reason"] = "stop" if ids[-1] in STOPS else "length"
        return answer

    with FaultProxy(harmony_server.url, lambda path, attempt, body: None, rewrite=rewrite) as proxy:
        env = trainer_env(harmony_model, tmp_path, proxy.port, MAX_STEPS=2, EVAL_STEPS=2, SAMPLES_STEPS=1,
                          REWARD_FUNCS="final_number,boxed_format", MAX_PROMPT_LENGTH=160,
                          MAX_COMPLETION_LENGTH=32, SYSTEM_PROMPT="Put the final answer in \\boxed{}.",
                          REASONING_EFFORT="low")
        result = run_trainer(env, tmp_path / "stdout.log")
    assert result.returncode == 0, result.stdout[-4000:]
    run_dir = tmp_path / "test-run"

    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        # only the first of each group has the right final answer; the second boxes a wrong one after reasoning
        # its way to the right one, which the stripped decode would have handed to the reward with two boxes
        assert r["rewards/final_number_reward/mean"] == pytest.approx(0.25)
        assert r["rewards/boxed_format_reward/mean"] == pytest.approx(0.5)
        assert r["completions/no_final_ratio"] == pytest.approx(0.5)  # the cut one and the random one
        assert r["completions/answer_only_in_analysis_ratio"] == pytest.approx(0.5)
        assert r["completions/malformed_ratio"] <= 0.25
        assert 0.25 <= r["completions/clipped_ratio"] <= 0.5  # the cut one, and the random one if it ran out
        assert r["completions/mean_final_length"] > 0 and r["completions/mean_analysis_length"] > 0
    assert rows[-1]["eval/rewards/final_number_reward/mean"] == 1.0 and rows[-1]["eval/completions/no_final_ratio"] == 0
    log = (run_dir / "training.log").read_text()
    assert re.search(r"step 2/2 \| .* \| no final 0\.50, malformed 0\.\d\d \|", log)

    sample = json.loads((run_dir / "samples.jsonl").read_text().splitlines()[0])
    answer = sample["completion"][0]
    assert answer["content"].startswith("\\boxed{") and answer["thinking"].startswith("Not \\boxed{")

    # every request names the stop tokens; the prompts are harmony's, dated with the run's first day
    assert all(body["stop_token_ids"] == STOPS for body in requests)
    date = (run_dir / "prompt_date").read_text().strip()
    prompt = tokenizer.decode(requests[0]["prompt"][0])
    assert prompt.startswith("<|start|>system<|message|>You are ChatGPT") and f"Current date: {date}\n" in prompt
    assert "Reasoning: low" in prompt
    assert "<|start|>developer<|message|># Instructions\n\nPut the final answer in \\boxed{}.<|end|>" in prompt
    assert prompt.endswith("<|start|>assistant")
