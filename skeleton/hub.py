"""Artifacts on the Hugging Face Hub: push a skeleton or an export with a model card, load one by repo id.

Local folders always win: a path that exists is used as is, and only a name of the form `owner/name`
that is not a local folder is looked up on the Hub (`huggingface_hub.snapshot_download`, which honours
HF_ENDPOINT, HF_HUB_OFFLINE and the usual cache). Uploads go through `HfApi.create_repo` and
`HfApi.upload_folder`, the library's own commit path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData, snapshot_download

import skeleton

CARD = "README.md"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(name: str | Path) -> bool:
    """Whether `name` can only mean a Hub repo: `owner/name` and not an existing local path."""
    text = str(name)
    return bool(_REPO_ID.match(text)) and not Path(text).expanduser().exists()


def resolve(path_or_repo: str | Path, *, revision: str | None = None, token: str | None = None) -> Path:
    """A local folder for `path_or_repo`: the path itself when it exists, else a snapshot of the repo."""
    if not is_repo_id(path_or_repo):
        return Path(path_or_repo).expanduser()
    folder = snapshot_download(
        str(path_or_repo),
        revision=revision,
        token=token,
        library_name="skeleton",
        library_version=skeleton.__version__,
    )
    return Path(folder)


# ---- model card ---------------------------------------------------------------------------------------
def _score(value, headline: str | None) -> str:
    """A score as points: a fraction, or a metrics dict read at the headline metric."""
    if isinstance(value, dict):
        value = value.get(headline) if headline else None
    return "not recorded" if value is None else f"{100 * float(value):.2f}"


def card_facts(meta: dict, **given) -> dict[str, str]:
    """The facts a card shows: skeleton.json's `extra` first, then what the caller passes in."""
    extra = {**meta.get("extra", {}), **{k: v for k, v in given.items() if v is not None}}
    headline = extra.get("headline")
    scores = extra.get("scores", {})
    rate, psi, speedup = extra.get("rate"), extra.get("psi"), extra.get("speedup")
    return {
        "task": meta["task"],
        "kind": meta["kind"],
        "backbone": meta["backbone"].get("name_or_path", "not recorded"),
        "backbone sha256": meta["backbone"].get("sha256", "not recorded"),
        "psi (points)": "not recorded" if psi is None else f"{psi:g}",
        "pruning rate": "not recorded" if rate is None else f"{100 * rate:.1f}%",
        f"dense score ({headline or 'headline'})": _score(scores.get("dense"), headline),
        f"pruned score ({headline or 'headline'})": _score(scores.get("pruned", extra.get("dev")), headline),
        "speedup": "not recorded" if speedup is None else f"x{speedup:.2f}",
        "FFN widths": ", ".join(map(str, meta["ffn_widths"])),
        "command": extra.get("command") or "not recorded",
    }


def _usage(kind: str, repo_id: str) -> str:
    if kind == "skeleton":
        return (
            "```python\nfrom skeleton.export import load_skeleton\n\n"
            f'model = load_skeleton("{repo_id}")  # rebuilds the dense backbone, checks its hash, prunes it\n```\n'
        )
    return (
        "```python\nimport skeleton.hf_native  # registers the pruned model classes\n"
        "from transformers import AutoModel\nfrom skeleton.hf_native import SkeletonForTask\n\n"
        f'backbone = AutoModel.from_pretrained("{repo_id}")  # the pruned backbone alone\n'
        f'model = SkeletonForTask.from_pretrained("{repo_id}")  # backbone + soft prompt + head\n```\n\n'
        "Without Skeleton installed, `AutoModel.from_pretrained(repo, trust_remote_code=True)` loads the pruned "
        "backbone from the `skeleton_pruned.py` shipped in this repo.\n"
    )


def _base_model(name: str) -> str | None:
    """The card's `base_model` must be a Hub repo id; local folders and tiny: specs are not."""
    return name if _REPO_ID.match(name) and not Path(name).exists() else None


def model_card(meta: dict, repo_id: str, **given) -> ModelCard:
    """A model card (YAML metadata + a table of the run's facts + usage) for an artifact's skeleton.json."""
    facts = card_facts(meta, **given)
    data = ModelCardData(
        library_name="skeleton",
        tags=["skeleton", "pruning", "prompt-tuning", meta["task"], f"skeleton-{meta['kind']}"],
        base_model=_base_model(facts["backbone"]),
    )
    rows = "\n".join(f"| {k} | `{v}` |" if k == "command" else f"| {k} | {v} |" for k, v in facts.items())
    what = (
        "pruned model (weights included)"
        if meta["kind"] == "export"
        else "skeleton (kept indices, no weights)"
    )
    body = (
        f"# {repo_id.split('/')[-1]}\n\n"
        f"A [Skeleton](https://arxiv.org/abs/2404.11916) {what} for **{meta['task']}**: a soft prompt and a "
        f"task head on `{facts['backbone']}` whose FFN neurons outside the task's were pruned away.\n\n"
        f"| | |\n|---|---|\n{rows}\n\n## Usage\n\n{_usage(meta['kind'], repo_id)}"
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def run_facts(folder: Path) -> dict:
    """Card facts from the training run an artifact sits in (its summary.json and Hydra overrides), if any:
    a run folder's `skeleton/` is pushed with the scores, speedup and command of that run."""
    run = next((d for d in (folder, folder.parent) if (d / "summary.json").is_file()), None)
    if run is None:
        return {}
    summary = json.loads((run / "summary.json").read_text())
    facts = {
        "scores": {k: summary.get(k, {}).get("dev") for k in ("dense", "pruned")},
        "speedup": summary.get("speedup"),
    }
    overrides = run / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        facts["command"] = " ".join(["skeleton-train", *(yaml.safe_load(overrides.read_text()) or [])])
    return facts


def push_to_hub(
    path: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    command: str | None = None,
    scores: dict | None = None,
    speedup: float | None = None,
):
    """Upload a skeleton artifact or an export (or a run folder's skeleton/) with a generated README.md.

    The card shows skeleton.json's `extra`, then the facts of the run folder it sits in (`run_facts`),
    then `command`, `scores` ({"dense": ..., "pruned": ...}, fractions or metrics dicts) and `speedup`
    when given. Returns the `CommitInfo` of the upload."""
    from skeleton.export import read_meta, resolve_artifact

    folder = resolve_artifact(path)
    meta = read_meta(folder)
    given = {"command": command, "scores": scores, "speedup": speedup}
    facts = {**run_facts(folder), **{k: v for k, v in given.items() if v is not None}}
    card = model_card(meta, repo_id, **facts)
    card.save(folder / CARD)
    api = HfApi(library_name="skeleton", library_version=skeleton.__version__)
    api.create_repo(repo_id, token=token, private=private, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        token=token,
        revision=revision,
        commit_message=commit_message or f"Upload Skeleton {meta['kind']} for {meta['task']}",
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m skeleton.hub FOLDER OWNER/NAME`: push an artifact, an export or a run folder."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m skeleton.hub", description=main.__doc__)
    parser.add_argument(
        "artifact", help="skeleton artifact, export folder, or run folder (uses its skeleton/)"
    )
    parser.add_argument("repo_id", help="the Hub repo to create or update, owner/name")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--command", help="the command that made it, for the model card")
    args = parser.parse_args(argv)
    info = push_to_hub(args.artifact, args.repo_id, private=args.private or None, command=args.command)
    print(f"pushed {args.artifact} to {info.repo_url}: commit {info.oid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
