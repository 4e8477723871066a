"""From sampled trajectories to training data: filters, preference pairs, KTO and RAFT sets, file checks.

The paper's recipe (reference/paper.md section 3, `useful_codes/annotate_data.py`):

1. Drop a trajectory whose predicted answer is longer than 20 characters, that never called the tool
   (fewer than 4 messages), that was cut short (hit the call limit, an odd number of messages, or more than
   2048 tokens), or whose environment broke.
2. Drop winners (correct trajectories) whose last tool output was an error: a memorised gold answer typed
   right after buggy code teaches the wrong thing.
3. Deduplicate within each prompt, separately for winners and losers, by the first assistant message.
4. For each prompt with a winner and a loser, shuffle both lists; if both hold more than N items pair
   pos[k] with neg[k] for k < N, otherwise sample N combinations from their Cartesian product. N = 1 is the
   paper's setting. KTO uses the same pairs, split into desirable / undesirable and shuffled (1:1). RAFT
   (section 5.4) keeps k correct trajectories per prompt for SFT.

Token ids and roles are the data here, as everywhere in mdpo: every test reads roles, turns, token ids,
the extracted `answer` and the executor's per-call status (`meta["tool_status"]`, written by the sampler).
Nothing is decoded. Where we deviate from the paper, and why:

- "Tool output contains 'error'" is the executor's status of that call (error, timeout, memory, crashed),
  not a substring search: a program may legitimately print the word "error", and a crash may not. A
  trajectory with tool turns but no recorded status is a DataError while that filter is on, never a silent keep.
- The paper also drops winners whose last output contains "none" and trajectories with an empty
  "Execution error" output. Both need the decoded text; we do not apply them.
- The paper's pre-filter drops *any* trajectory with a boxed answer right after an error, losers included.
  We drop only winners: a wrong answer after buggy code is a fair negative, and keeping it keeps more
  prompts with both labels.
- "Every non-final assistant message holds python" needs no filter: the sampler ends a model turn for the
  tool only when the turn closes a ```python block.
- "Cut short" is the sampler's finish_reason (max_turns, max_length, max_new_tokens) plus the token count:
  a truncated trajectory has no real final answer, so neither label is trustworthy.
- A trajectory with no extracted answer (answer None) is kept by the length filter and counts as a loser.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from mdpo.atomic import atomic_open
from mdpo.trajectory import Role, Trajectory, TrajectoryError, read_jsonl

if TYPE_CHECKING:  # a hint only: mdpo.config imports the objectives, which import this module
    from mdpo.config import FilterConfig

# Filter names, in the order a dropped trajectory is attributed to them; each is a FilterConfig switch.
FILTERS: tuple[str, ...] = ("no_tool_call", "long_answer", "overlong", "correct_after_error",
                            "duplicate_first_turn")
TRUNCATED_REASONS = ("max_turns", "max_length", "max_new_tokens")  # finish reasons without a final answer

Pair = tuple[Trajectory, Trajectory]


class DataError(ValueError):
    """A data file is missing, malformed or not what was written; one line naming the file."""


def _stable_seed(*parts) -> int:
    """A seed from `parts` that is the same in every process (Python's hash() of a str is salted)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


# ---------------------------------------------------------------- filters
def first_model_turn(t: Trajectory) -> tuple[int, ...]:
    """Token ids the policy sampled in its first turn: the key of the duplicate filter. A continuation (sampled
    from a prefix, meta["branch"] = where it starts) shares its earlier turns: its first turn is its own first."""
    start = t.meta.get("branch", 0) if isinstance(t.meta, dict) else 0
    first = next((turn for turn, role in zip(t.turns[start:], t.roles[start:]) if role == Role.MODEL), 1)
    return tuple(tok for tok, role, turn in zip(t.tokens[start:], t.roles[start:], t.turns[start:])
                 if turn == first and role == Role.MODEL)


def _drop_reason(t: Trajectory, cfg: FilterConfig, max_length: int) -> str | None:
    """The first per-trajectory filter (FILTERS order, duplicates excluded) that removes `t`, or None."""
    if cfg.no_tool_call and Role.TOOL not in t.roles:
        return "no_tool_call"
    if cfg.long_answer and t.answer is not None and len(t.answer) > cfg.max_answer_chars:
        return "long_answer"
    if cfg.overlong and (len(t.tokens) > max_length or t.finish_reason in TRUNCATED_REASONS):
        return "overlong"
    status = t.meta.get("tool_status") if isinstance(t.meta, dict) else None
    if cfg.correct_after_error and status is None and Role.TOOL in t.roles:
        # The sampler records a status for every call. Without one the filter cannot tell a winner after a
        # failed cell from a clean one, and keeping it (the old default) let the filter do nothing unnoticed.
        raise DataError(f"trajectory {t.prompt_id}/{t.sample_id} called the tool but has no meta['tool_status'] "
                        "(not written by mdpo.sampler?): filters.correct_after_error cannot be applied; "
                        "resample it or set filters.correct_after_error: false")
    if cfg.correct_after_error and t.correct is True and status and status[-1] != "ok":
        return "correct_after_error"
    return None


def apply_filters(trajectories: Iterable[Trajectory], cfg: FilterConfig,
                  max_length: int) -> tuple[list[Trajectory], dict[str, int]]:
    """Keep the trajectories that pass the enabled filters, in input order.

    Returns (kept, counts): counts has "input", one entry per FILTERS name (trajectories that filter removed,
    each attributed to the first filter in FILTERS order that removes it) and "kept".
    """
    counts = {"input": 0, **{name: 0 for name in FILTERS}, "kept": 0}
    kept: list[Trajectory] = []
    # Duplicates are looked for among the survivors of the other filters only: otherwise the first copy
    # could be dropped for another reason and take every later copy with it.
    seen: set[tuple] = set()
    for t in trajectories:
        counts["input"] += 1
        reason = _drop_reason(t, cfg, max_length)
        if reason is None and cfg.duplicate_first_turn:
            key = (t.prompt_id, t.correct is True, first_model_turn(t))
            if key in seen:
                reason = "duplicate_first_turn"
            seen.add(key)
        if reason is None:
            kept.append(t)
        else:
            counts[reason] += 1
    counts["kept"] = len(kept)
    return kept, counts


# ---------------------------------------------------------------- pairs, KTO, RAFT
def _by_prompt(trajectories: Iterable[Trajectory]) -> dict[str, list[Trajectory]]:
    """Trajectories grouped by prompt id, sorted by id; input order within a prompt."""
    groups: dict[str, list[Trajectory]] = defaultdict(list)
    for t in trajectories:
        groups[t.prompt_id].append(t)
    return {pid: groups[pid] for pid in sorted(groups)}


def build_pairs(trajectories: Iterable[Trajectory], pairs_per_prompt: int, seed: int) -> list[Pair]:
    """(chosen, rejected) pairs by the paper's rule (section 3 step 4); prompts in sorted id order.

    Winners are correct == True, losers everything else. A prompt lacking either gives no pair.
    """
    n = pairs_per_prompt
    if n < 1:
        raise ValueError(f"pairs_per_prompt must be >= 1, got {n}")
    pairs: list[Pair] = []
    for pid, group in _by_prompt(trajectories).items():
        pos = [t for t in group if t.correct is True]
        neg = [t for t in group if t.correct is not True]
        if not pos or not neg:
            continue
        rng = random.Random(_stable_seed(seed, pid))  # per prompt: adding a prompt changes no other's pairs
        rng.shuffle(pos)
        rng.shuffle(neg)
        if len(pos) > n and len(neg) > n:
            pairs += list(zip(pos[:n], neg[:n]))  # distinct trajectories on both sides
        else:
            product = list(itertools.product(pos, neg))
            pairs += rng.sample(product, min(n, len(product)))
    return pairs


def pair_stats(trajectories: Iterable[Trajectory]) -> dict:
    """Label statistics of a rollout set for the per-iteration report (paper: % correct, coverage)."""
    groups = _by_prompt(trajectories)
    n = sum(len(g) for g in groups.values())
    correct = sum(t.correct is True for g in groups.values() for t in g)
    with_correct = sum(any(t.correct is True for t in g) for g in groups.values())
    with_wrong = sum(any(t.correct is not True for t in g) for g in groups.values())
    both = sum(any(t.correct is True for t in g) and any(t.correct is not True for t in g)
               for g in groups.values())
    reasons = Counter(t.finish_reason for g in groups.values() for t in g)
    return {
        "trajectories": n,
        "prompts": len(groups),
        "correct": correct,
        "correct_share": correct / n if n else 0.0,
        "no_answer": sum(t.answer is None for g in groups.values() for t in g),
        "prompts_with_correct": with_correct,
        "prompts_with_incorrect": with_wrong,
        "prompts_with_both": both,
        "coverage": both / len(groups) if groups else 0.0,  # share of prompts that can give a pair
        "finish_reasons": dict(sorted(reasons.items())),
    }


def build_kto(pairs: Iterable[Pair], seed: int) -> list[Trajectory]:
    """The M-KTO set: every chosen (desirable) and every rejected (undesirable), shuffled; pairing dropped.

    The label is the `correct` field the trainer reads. A rejected trajectory with no extracted answer
    (correct None) is labelled False: it lost its pair, and the M-KTO loader refuses an unlabelled one.
    Copies are returned; the input trajectories are not changed.
    """
    pairs = list(pairs)
    out = [dataclasses.replace(c, correct=True) for c, _ in pairs]
    out += [dataclasses.replace(r, correct=False) for _, r in pairs]
    random.Random(seed).shuffle(out)
    return out


def build_raft(trajectories: Iterable[Trajectory], k: int, seed: int) -> list[Trajectory]:
    """RAFT's SFT set (paper section 5.4): at most k correct trajectories per prompt, chosen at random.

    Prompts in sorted id order; the chosen ones keep their input order within a prompt.
    """
    if k < 1:
        raise ValueError(f"RAFT k must be >= 1, got {k}")
    out: list[Trajectory] = []
    for pid, group in _by_prompt(trajectories).items():
        idx = [i for i, t in enumerate(group) if t.correct is True]
        rng = random.Random(_stable_seed(seed, pid))
        out += [group[i] for i in sorted(rng.sample(idx, min(k, len(idx))))]
    return out


# ---------------------------------------------------------------- held-out split
def split_heldout(problems: list[dict], n_or_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split problems into (train, heldout), both in input order.

    n_or_fraction < 1 is a fraction of the problems (rounded, at least one); >= 1 an absolute count.
    Held-out ids are the lowest by a stable hash of (seed, id), so the split depends on the ids and the
    seed, not on the file's order. Raises ValueError if either part would be empty or ids repeat.
    """
    ids = []
    for i, p in enumerate(problems):
        if not isinstance(p, dict) or "id" not in p:
            raise ValueError(f"problem {i} has no 'id'")
        ids.append(p["id"])
    dup = next((x for x, c in Counter(ids).items() if c > 1), None)
    if dup is not None:
        raise ValueError(f"problem id {dup!r} occurs more than once; ids must be unique to split")
    total = len(problems)
    if n_or_fraction <= 0:
        raise ValueError(f"held-out size must be > 0, got {n_or_fraction}")
    if n_or_fraction < 1:
        n = max(1, round(n_or_fraction * total))
    elif float(n_or_fraction).is_integer():
        n = int(n_or_fraction)
    else:
        raise ValueError(f"held-out size {n_or_fraction} is neither a fraction (< 1) nor a whole count")
    if total == 0:
        raise ValueError("no problems to split: the held-out part would be empty")
    if n >= total:
        raise ValueError(f"held-out size {n} of {total} problems leaves no training problems")
    ranked = sorted(range(total), key=lambda i: (_stable_seed(seed, ids[i]), str(ids[i])))
    held = set(ranked[:n])
    train = [p for i, p in enumerate(problems) if i not in held]
    heldout = [p for i, p in enumerate(problems) if i in held]
    return train, heldout


# ---------------------------------------------------------------- files
def write_pairs(path, pairs: Iterable[Pair]) -> dict:
    """Write {"chosen": trajectory, "rejected": trajectory} JSONL atomically (mdpo.train's mdpo format).

    Returns {"rows", "sha256"} of the bytes written, for verify_file.
    """
    h, rows = hashlib.sha256(), 0
    with atomic_open(path, "wb") as f:
        for chosen, rejected in pairs:
            # to_json() is a JSON object, so splicing it in embeds the trajectory as an object, not a string.
            line = ('{"chosen": ' + chosen.to_json() + ', "rejected": ' + rejected.to_json() + "}\n").encode()
            f.write(line)
            h.update(line)
            rows += 1
    return {"rows": rows, "sha256": h.hexdigest()}


def read_pairs(path) -> list[Pair]:
    """The pairs of a write_pairs file; a malformed line raises DataError naming file and line."""
    pairs: list[Pair] = []
    for where, d in read_jsonl(path, DataError):
        if not isinstance(d, dict) or not isinstance(d.get("chosen"), dict) or not isinstance(d.get("rejected"), dict):
            raise DataError(f"{where}: a pair needs 'chosen' and 'rejected' trajectory objects")
        try:
            pairs.append((Trajectory.from_dict(d["chosen"], where), Trajectory.from_dict(d["rejected"], where)))
        except TrajectoryError as e:
            raise DataError(str(e)) from None
    return pairs


def file_digest(path) -> dict:
    """{"rows": non-blank lines, "sha256": hex digest of the bytes} of a JSONL file."""
    h, rows = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for line in f:
            h.update(line)
            rows += bool(line.strip())
    return {"rows": rows, "sha256": h.hexdigest()}


def verify_file(path, expected: dict) -> None:
    """Raise DataError unless `path` exists and matches `expected` ({"rows", "sha256"}, either may be absent)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing file (expected {expected.get('rows', '?')} rows)")
    found = file_digest(path)
    if "rows" in expected and found["rows"] != expected["rows"]:
        raise DataError(f"{path}: expected {expected['rows']} rows, found {found['rows']} (truncated or "
                        "overwritten?)")
    if "sha256" in expected and found["sha256"] != expected["sha256"]:
        raise DataError(f"{path}: checksum mismatch (expected sha256 {expected['sha256'][:16]}..., found "
                        f"{found['sha256'][:16]}...)")


# ---------------------------------------------------------------- SFT data from chat messages
def trajectory_from_turns(tok, question: str, turns: list[tuple[str, str | None]], prompt_id: str,
                          sample_id: int = 0, empty_output: str | None = None, chat=None) -> Trajectory:
    """Token ids and roles of a written-out trajectory, laid out exactly as mdpo.sampler lays out a rollout.

    turns: [(model text, observation or None)]: a model turn ending in a ```python block is followed by the
    interpreter's raw observation; the last turn (observation None) ends with the policy's own <end_of_turn>.
    Each piece is tokenised on its own, as the sampler produces it (model turns are the policy's tokens; the
    template and tool pieces are what the sampler injects, from the same mdpo.chat format), so SFT data and
    rollouts share one layout. Observations go through mdpo.tools.observation_text, as in rollouts: cleaned,
    and `empty_output` (None: mdpo.tools.EMPTY_OUTPUT, the paper's text) in place of an empty one.
    """
    from mdpo.chat import for_tokenizer
    from mdpo.tools import EMPTY_OUTPUT, observation_text

    chat = chat or for_tokenizer(tok)
    empty = EMPTY_OUTPUT if empty_output is None else empty_output
    tokens: list[int] = []
    roles: list[int] = []
    turn_ids: list[int] = []

    def add(ids, role, turn):
        tokens.extend(ids)
        roles.extend([role] * len(ids))
        turn_ids.extend([turn] * len(ids))

    add(tok.encode(tok.render_chat([{"role": "user", "content": question}])), Role.PROMPT, 0)
    for k, (text, observation) in enumerate(turns, start=1):
        if k > 1:
            add(tok.encode(chat.open(chat.model_role), start=False), Role.TEMPLATE, k)
        add(tok.encode(text, start=False), Role.MODEL, k)
        if observation is None:
            add([tok.end_of_turn_id], Role.MODEL, k)  # the policy's own stop token is an action
        else:
            add(tok.encode(chat.close, start=False), Role.TEMPLATE, k)
            add(chat.tool_turn_ids(tok, observation_text(observation, empty)), Role.TOOL, k)
    return Trajectory(prompt_id, sample_id, tokens, roles, turn_ids, finish_reason="end_of_turn")


def _check_messages(messages: list, where: str) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} should be an object with string 'role' and 'content'")


def trajectory_from_messages(tok, messages: list[dict], prompt_id: str, where: str = "<messages>",
                             empty_output: str | None = None) -> Trajectory:
    """A chat in the paper's SFT format (user question, then assistant turns, each code turn answered by a user
    turn "```output\\n...\\n```") as a trajectory with roles (observations as in trajectory_from_turns).
    Raises DataError naming `where` on another shape."""
    from mdpo.chat import for_tokenizer

    chat = for_tokenizer(tok)
    _check_messages(messages, where)
    if not messages or messages[0].get("role") != "user" or len(messages) % 2 != 0:
        raise DataError(f"{where}: expected user, assistant, (user {chat.output_fence}, assistant)* messages")
    turns: list[tuple[str, str | None]] = []
    for i in range(1, len(messages), 2):
        m = messages[i]
        if m.get("role") not in ("assistant", "model") or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} should be the assistant's")
        obs = None
        if i + 1 < len(messages):
            tool = messages[i + 1].get("content", "")
            if messages[i + 1].get("role") != "user" or not (tool.startswith(chat.output_open) and
                                                                 tool.endswith(chat.output_close)):
                raise DataError(f"{where}: message {i + 1} should be a user turn holding "
                                f"{chat.output_open.strip()} ... {chat.output_close.strip()}")
            obs = tool[len(chat.output_open):-len(chat.output_close)]
        turns.append((m["content"], obs))
    return trajectory_from_turns(tok, messages[0]["content"], turns, prompt_id, empty_output=empty_output, chat=chat)


def convert_messages(src, dst, tokenizer_dir) -> int:
    """JSONL of {"messages": [...]} (optionally "id", "correct") -> trajectory JSONL for `make sft`."""
    from mdpo.tokenizer import load_tokenizer
    from mdpo.trajectory import write_trajectories

    out = []
    rows = list(read_jsonl(src, DataError, objects=True, empty_ok=False))  # a bad file fails before the tokenizer
    for where, row in rows:
        if not isinstance(row.get("messages"), list):
            raise DataError(f"{where}: expected an object with a 'messages' list")
        _check_messages(row["messages"], where)
    tok = load_tokenizer(tokenizer_dir)
    for i, (where, row) in enumerate(rows):
        t = trajectory_from_messages(tok, row["messages"], str(row.get("id", i)), where)
        t.correct = row.get("correct")
        out.append(t)
    return write_trajectories(dst, out)


def main(argv=None) -> int:
    """`python -m mdpo.data --messages ... --tokenizer ... --out ...`, or `python -m mdpo.data fetch NAME...`."""
    import argparse
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["fetch"]:  # prefetch datasets into the data dir (mdpo.datasets)
        from mdpo.datasets import fetch_main

        return fetch_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m mdpo.data",
                                 description="Convert chat-format SFT data into mdpo trajectories (token ids + roles). "
                                             "`python -m mdpo.data fetch gsm8k math math500` downloads datasets.")
    ap.add_argument("--messages", required=True, help='JSONL, one {"messages": [...]} per line')
    ap.add_argument("--tokenizer", required=True, help="folder with tokenizer.model (the model's)")
    ap.add_argument("--out", required=True, help="trajectory JSONL (sft.data of an experiment)")
    args = ap.parse_args(argv)
    from mdpo.tokenizer import TokenizerError

    try:
        if Path(args.out).is_dir():
            raise DataError(f"--out {args.out}: is a directory; give the trajectory JSONL file to write")
        n = convert_messages(args.messages, args.out, args.tokenizer)
    except (DataError, TokenizerError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{n} trajectories -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
