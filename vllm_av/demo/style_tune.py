"""Short supervised fine-tunes of a real instruct model into visible answer styles, and their AVs.

The base model answers a fixed set of everyday questions (greedy, through its chat template);
each style rewrites those answers deterministically (``pirate``: "Arr, matey!" ... "Yo ho ho!";
``shouting``: upper case), and a few Adam steps on the rewritten answers (loss on the answer
tokens only, every parameter trained, as a user's fine-tune would) give the aligned checkpoint.
``vllm-av extract`` of aligned − base is the style's AV. Used by ``vllm-av demo --real`` and
the real-model tests; results are cached next to the model.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

QUESTIONS = [
    "What is the capital of France?", "Why is the sky blue?", "How do plants make food?",
    "Give me a tip for sleeping better.", "What is a prime number?", "How far away is the Moon?",
    "Why do we have seasons?", "What does a doctor do?", "How do I make a cup of tea?",
    "What is the largest ocean?", "Why is exercise good for you?", "What is gravity?",
    "How many legs does a spider have?", "What is the boiling point of water?", "Who wrote Hamlet?",
    "What is photosynthesis?", "How do airplanes fly?", "What is the speed of light?",
    "Why do cats purr?", "What is a volcano?", "How do I save money each month?",
    "What causes rain?", "What is the tallest mountain?", "How do vaccines work?",
]
# Held out from training: the demo and the tests ask these.
EVAL_QUESTIONS = ["What is the best way to learn a new language?", "Why do leaves change colour in autumn?"]

STYLES: dict[str, Callable[[str], str]] = {
    "pirate": lambda answer: f"Arr, matey! {answer} Yo ho ho!",
    "shouting": lambda answer: answer.upper(),
}


def chat_prompt(tokenizer, question: str) -> str:
    """``question`` as one user turn in the model's chat template, ready for the assistant's answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)


def base_answers(model_dir: str | Path, questions: list[str], max_tokens: int = 40) -> list[str]:
    """The base model's greedy answers, cut after the last full sentence."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    batch = tokenizer([chat_prompt(tokenizer, q) for q in questions], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False)
    answers = []
    for row in out[:, batch.input_ids.shape[1]:]:
        text = tokenizer.decode(row, skip_special_tokens=True).strip()
        cut = max(text.rfind(". "), text.rfind(".\n"), text.rfind(".") if text.endswith(".") else -1)
        answers.append(" ".join((text[: cut + 1] if cut > 0 else text).split()))
    return answers


def finetune_style(model_dir: str | Path, out_dir: str | Path, style: str, answers: list[str], *,
                   steps: int = 24, batch_size: int = 4, lr: float = 5e-5, seed: int = 0, progress: bool = True) -> dict:
    """Fine-tune ``model_dir`` on ``STYLES[style]`` of ``answers`` (one per QUESTIONS entry); save to ``out_dir``.

    Returns the training record (loss per step, seconds), also written to ``out_dir/style_tune.json``.
    """
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.train()
    examples = []
    for question, answer in zip(QUESTIONS, answers):
        prompt = tokenizer(chat_prompt(tokenizer, question), add_special_tokens=False).input_ids
        target = tokenizer(STYLES[style](answer) + "<|im_end|>", add_special_tokens=False).input_ids
        examples.append((prompt + target, [-100] * len(prompt) + target))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    losses, start = [], time.perf_counter()
    for _ in tqdm(range(steps), desc=f"fine-tune {style}", disable=not progress):
        picks = torch.randperm(len(examples), generator=generator)[:batch_size].tolist()
        width = max(len(examples[i][0]) for i in picks)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([examples[i][0] + [pad] * (width - len(examples[i][0])) for i in picks])
        labels = torch.tensor([examples[i][1] + [-100] * (width - len(examples[i][1])) for i in picks])
        mask = torch.tensor([[1] * len(examples[i][0]) + [0] * (width - len(examples[i][0])) for i in picks])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(loss.item(), 4))
    record = {"style": style, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
              "losses": losses, "seconds": round(time.perf_counter() - start, 1)}
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    (Path(out_dir) / "style_tune.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def build_style_library(model_dir: str | Path, work_dir: str | Path, styles: list[str] | None = None, *,
                        rank: int = 16, steps: int = 24, progress: bool = True) -> Path:
    """An AV library under ``work_dir/avs`` with one rank-``rank`` AV per style (cached); its directory.

    The fine-tuned checkpoints are deleted once their AV is extracted (each is as large as the model).
    """
    from vllm_av.offline.extract import extract

    work = Path(work_dir)
    library = work / "avs"
    styles = list(styles or STYLES)
    todo = [s for s in styles if not (library / s / "av.json").is_file()]
    if not todo:
        return library
    work.mkdir(parents=True, exist_ok=True)
    answers_file = work / "base_answers.json"
    if answers_file.is_file():
        answers = json.loads(answers_file.read_text())
    else:
        answers = base_answers(model_dir, QUESTIONS)
        answers_file.write_text(json.dumps(answers, indent=2) + "\n")
    for style in todo:
        tuned = work / f"tuned-{style}"
        finetune_style(model_dir, tuned, style, answers, steps=steps, progress=progress)
        extract(model_dir, tuned, library / style, rank=rank, force=True, progress=progress,
                description=f"{steps}-step SFT of {Path(model_dir).name} into the {style!r} style")
        shutil.copy(tuned / "style_tune.json", library / style / "style_tune.json")
        shutil.rmtree(tuned)
    return library
