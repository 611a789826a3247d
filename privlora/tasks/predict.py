"""Use a run's trained model: ``privlora predict DIR "text" ...`` or ``--file texts.csv``.

The run folder holds everything needed: ``model.json`` (the base model's identity, e.g.
``embedded:minilm``, the label names and the max length) and ``adapter/`` (peft format: the
trained LoRA factors and classification head). `load_run` puts the adapter on the base model
exactly as the peft recipe in docs/results.md does (the run's task loads the base,
`privlora.tasks.models.load_base_for_run`, then ``PeftModel.from_pretrained``) and returns the
task's class, whose ``predict`` reads the model: for "classification" (`predict`), per text, the
most likely label and the softmax probability of every label. A task without predictions (e.g.
"causal-lm") refuses when its base is asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from privlora.core.errors import RunFolderError

TEXT_FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".txt")


@dataclass(frozen=True)
class Prediction:
    text: str
    label: str
    probability: float
    probabilities: dict[str, float]

    def to_dict(self) -> dict:
        return {"text": self.text, "label": self.label, "probability": self.probability, "probabilities": self.probabilities}


def load_run(run_dir: str | Path):
    """``(task class, model, tokenizer, label_names)``: the run's base model with its adapter, in
    eval mode, and the class of the task that made it (whose ``predict`` reads the model)."""
    from peft import PeftModel

    from privlora.tasks.models import MODEL_CARD, card_task, read_model_card

    run = Path(run_dir)
    if not run.is_dir():
        raise RunFolderError(f"predict: {run} is not a folder; give the --out folder of a finished privlora run")
    adapter = run / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        if (run / "report.md").is_file() and not (run / "checkpoint" / "state.json").is_file():
            raise RunFolderError(
                f"predict: {run} is a finished run whose trained adapter was not kept ({adapter} is absent: a committed "
                f"example keeps only its report, metrics and ledger); to get a model to predict with, run the same config "
                f"again: `privlora run {run / 'config.toml'} --out NEW_DIR`, then `privlora predict NEW_DIR ...`")
        how = (f"continue it with `privlora run --resume {run}`" if (run / "checkpoint" / "state.json").is_file()
               else "run it to the end first")
        raise RunFolderError(f"predict: {adapter} holds no adapter: the run has not finished; {how}")
    card = read_model_card(run)
    task = card_task(card, run / MODEL_CARD)
    base, tokenizer, names = task.load_base_for_card(card, run)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    return task, model, tokenizer, names


def load_run_model(run_dir: str | Path):
    """``(model, tokenizer, label_names)``: the run's base model with its adapter, in eval mode."""
    return load_run(run_dir)[1:]


def read_texts(path: str | Path, column: str = "text") -> list[str]:
    """Texts from a csv/tsv (``column``), jsonl/json (``column`` of each record) or txt (one per line)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise RunFolderError(f"predict --file: {path} does not exist; give a {'/'.join(TEXT_FORMATS)} file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            texts = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            return texts
        if suffix in (".csv", ".tsv"):
            frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
        elif suffix in (".jsonl", ".json"):
            try:
                frame = pd.read_json(path, lines=True, dtype=False)
            except ValueError:
                frame = pd.read_json(path, dtype=False)
        else:
            raise RunFolderError(f"predict --file: cannot tell the format of {path.name!r}; use one of {', '.join(TEXT_FORMATS)}")
    except UnicodeDecodeError as exc:
        raise RunFolderError(f"predict --file: {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from exc
    except pd.errors.EmptyDataError:
        raise RunFolderError(f"predict --file: {path} is empty; give a file with a {column!r} column") from None
    except ValueError as exc:
        raise RunFolderError(f"predict --file: could not read {path} ({exc})") from exc
    if column not in frame.columns:
        raise RunFolderError(f"predict --column: {path} has no column {column!r}; its columns are {list(map(str, frame.columns))}")
    texts = [str(t) for t in frame[column].tolist()]
    if not texts:
        raise RunFolderError(f"predict --file: {path} has a header but no rows")
    return texts


def predict(model, tokenizer, names: list[str], texts: list[str], batch_size: int = 32) -> list[Prediction]:
    """Task "classification": the most likely label and every label's probability, per text
    (softmax of the logits)."""
    import torch

    out: list[Prediction] = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            enc = tokenizer(chunk, truncation=True, padding=True, return_tensors="pt")
            probs = model(**enc).logits.softmax(-1)
            for text, row in zip(chunk, probs.tolist()):
                best = max(range(len(row)), key=row.__getitem__)
                out.append(Prediction(text, names[best], row[best], {n: p for n, p in zip(names, row)}))
    return out


def format_prediction(p: Prediction, as_json: bool = False) -> str:
    """One line: ``label<TAB>probability<TAB>text`` (or a JSON object with every probability)."""
    if as_json:
        return json.dumps(p.to_dict(), ensure_ascii=False)
    return f"{p.label}\t{p.probability:.4f}\t{p.text}"
