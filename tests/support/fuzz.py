"""The long reliability profile, and the document it regenerates: ``python -m tests.support.fuzz``.

1. Every case of the bad-input catalog (:mod:`tests.support.bad_inputs`) through the ``bnfold`` command in
   its own process, and through the API.
2. ``--examples`` random graphs (:mod:`tests.support.graph_fuzz`), in worker processes of ``--chunk``
   examples each, so a crash of the interpreter costs one chunk and is counted as a failure.
3. ``--mutations`` byte mutants of real model files (:mod:`tests.support.byte_fuzz`), each in a worker
   process that is replaced when it dies.

It writes ``docs/reliability.md`` (the tables) and ``docs/reliability.json`` (this run's figures), and copies
every failing model to ``build/fuzz-failures/`` for reproduction. Exit code 0 if nothing failed, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

# Bugs these checks found, and where they were fixed: (found by, what went wrong, the fix).
BUGS_FOUND = (
    ("graph fuzzer", "verify's onnx.reference fallback (float64, bfloat16) ran opset 9-13 BatchNormalization "
     "with batch statistics: onnx.reference reads the momentum attribute's default as training mode. Every "
     "correct fold of a float64 model at those opsets failed verification (exit 1, nothing written).",
     "`reference_fixes.reference_evaluator` supplies an inference-mode BatchNormalization for opsets 9-13"),
    ("graph fuzzer", "verify's onnx.reference fallback computed grouped ConvTranspose wrongly (wrong weight rows, "
     "the whole bias added to every group, one output channel per group), so float64 and bfloat16 models with "
     "one were verified against wrong numbers.",
     "`reference_fixes.reference_evaluator` runs grouped ConvTranspose one group at a time"),
    ("graph fuzzer", "Not idempotent: a fold that leaves a shift Add (MatMul -> BN) which could fold into the next "
     "layer, or that unblocks a node the sweep had passed (Sub -> Flatten -> MatMul -> BN), was left to a "
     "second run of bnfold.",
     "`onnx/fold/driver.py`: `fold_graph` sweeps again until nothing folds, one record per batch norm"),
    ("graph fuzzer", "Not idempotent: the value a rewrite renames (a MatMul's output, before its new bias Add) "
     "lost its inferred type, so a later fold in the same run refused it as of unknown rank.",
     "`onnx/graph/index.py`: `GraphIndex.set_output` carries the type over to the new name"),
    ("byte fuzzer", "Text fields that are not UTF-8 (protobuf hands them back as bytes) ended in \"internal "
     "error (UnicodeDecodeError)\", exit 3.",
     "`onnx/store/io.py`: `check_supported` refuses them when the model is read"),
    ("byte fuzzer", "onnx.checker raising ValueError (\"Invalid tensor data type 33\") or UnicodeDecodeError "
     "instead of ValidationError ended in \"internal error\", exit 3.",
     "`api._check` and `guard.FoldedModelCheck`: any exception of the checker fails the check"),
    ("bad inputs", "SIGTERM killed bnfold on the spot and left its staging directory `.out.onnx.*.tmp` behind.",
     "`cli.py`, `interrupts.py`: SIGTERM is handled like SIGINT (exit 128+signal, one line); creating the "
     "temporary and renaming a model with its data file are deferred past signals"),
    ("bad inputs", "A FIFO given as the model blocked bnfold forever.",
     "`io.read_model`: regular files only"),
    ("bad inputs", "A model of opset 99 passed onnx.checker and failed in onnxruntime with a long message.",
     "`io.check_supported`: IR version and opset must be known to the installed onnx"),
    ("bad inputs", "`verify` of models whose declared input shapes differ failed inside onnxruntime.",
     "`verify._check_interfaces` compares static input shapes first"),
    ("bad inputs", "`verify` of a model declaring a huge input (12 TiB) tried to allocate it: \"internal "
     "error (MemoryError)\", exit 3.", "`limits.GENERATED_INPUT_LIMIT` (4 GiB per generated input)"),
    ("bad inputs", "`--inputs` given a file that is not a .npz was refused with numpy's message about pickled "
     "data.", "`verify._read_npz` checks the zip signature first"),
    ("bad inputs", "`verify` passed a candidate with external data to onnx and onnxruntime without bnfold's "
     "location checks, relying on theirs (onnxruntime does refuse `../`, in its own words).",
     "`verify` reads both models through `io.read_model`"),
    ("bad inputs", "Usage errors (an unknown option, an unreadable path) printed click's multi-line usage block.",
     "`cli._Command`: one line, with a pointer to `--help`"),
    ("bad inputs", "A PyTorch output in a read-only directory ended in \"internal error (PermissionError)\", "
     "exit 3.", "`core/atomic.atomic_destination`: OutputError"),
    ("guard", "A folded model failing onnx.checker aborted the whole fold with an internal error.",
     "`guard.py`: per-pattern guard, the offending folds are found by refolding and left as `guard_rejected`"),
    ("differential fuzz", "A model read lazily from a file (weights left on disk until a fold reads them) "
     "whose Reshape target was left on disk too hid the target's values from shape inference: a batch norm "
     "after the Reshape was left `unknown_shape` that the in-memory fold folded.",
     "`wire._read_initializer` never leaves a tensor of `limits.KEPT_ELEMENTS` or fewer elements on disk"),
    ("differential fuzz", "Tensors the lazy reader left in the file came back in `FoldResult.model` with an "
     "explicit `data_location: DEFAULT` the file never had (4 bytes more than the in-memory fold's model).",
     "`io.set_inline` clears the field"),
    ("byte fuzzer", "A bit flip that makes a batch-norm parameter a signalling NaN printed numpy's RuntimeWarning "
     "(\"invalid value encountered in cast\") as it was widened to float64, beside bnfold's output.",
     "`affine._as_float64_vector` widens with the flag ignored; the NaN is refused as `non_finite_params`"),
    ("byte fuzzer", "A model that fails while onnxruntime runs it during verification printed onnxruntime's own "
     "error log line above bnfold's one-line error.", "`runtime.unoptimized_options`: log severity 4 (fatal only)"),
)


# --- 1. bad inputs -----------------------------------------------------------------------------------

def bad_input_rows() -> list[dict[str, Any]]:
    from tests.support.bad_inputs import (
        CASES,
        available,
        error_line,
        judge,
        run_api,
        run_api_subprocess,
        run_cli_subprocess,
        scratch,
        snapshot,
    )

    rows = []
    for case in CASES:
        row: dict[str, Any] = {"key": case.key, "category": case.category, "what": case.what}
        reason = available(case)
        if reason is not None:
            rows.append({**row, "skipped": reason})
            continue
        with scratch(case) as directory:
            if directory is None:
                rows.append({**row, "skipped": "no small file system (needs root and mount)"})
                continue
            setup = case.build(directory)
            before = snapshot(directory)
            outcome = judge(case, run_cli_subprocess(case, setup, directory), before, snapshot(directory), setup)
            said = error_line(outcome) if outcome.exit_code else _report_reason(outcome.stdout, case.says)
            row.update(exit_code=outcome.exit_code, says=said.replace(str(directory), "…"),
                       problems=list(outcome.problems))
        if "unprivileged" in case.needs:
            api_problems = run_api_subprocess(case)
        else:
            with scratch(case) as directory:
                assert directory is not None
                api_problems = run_api(case, case.build(directory))
        row.update(api=case.error.__name__ if case.error else "returns", api_problems=api_problems)
        rows.append(row)
    return rows


def _report_reason(stdout: str, reason: str) -> str:
    line = next((line for line in stdout.splitlines() if reason in line), "")
    return " ".join(line.split())


# --- 2. random graphs --------------------------------------------------------------------------------

def graph_chunk(examples: int, seed: int, failures: Path) -> dict[str, Any]:
    """``examples`` random graphs from hypothesis seed ``seed``, in this process; their figures."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    from tests.support.graph_fuzz import check, fuzz_cases, generator_problem

    counts: Counter[str] = Counter()
    found: list[dict[str, Any]] = []

    @hypothesis_seed(seed)
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(fuzz_cases())
    def one(case: Any) -> None:
        counts["examples"] += 1
        problem = generator_problem(case)
        if problem is not None:
            counts[f"generator {problem[0]}"] += 1
            if problem[0] == "invalid":
                found.append(_keep(case, [f"generator: {problem[1]}"], failures, seed, counts["examples"]))
            return
        verdict = check(case)
        counts[f"engine {verdict.engine}"] += 1
        counts[f"dtype {_dtype(case).name}"] += 1
        counts.update(f"op {op}" for op in case.ops)
        counts["unsafe batch norms"] += len(case.must_stay)
        counts.update(f"option {key}" for key in case.options)
        for record in verdict.records:
            if record.op_type == "BatchNormalization":
                counts["batch norms"] += 1
                counts[f"{record.status} {record.pattern if record.status == 'folded' else record.reason}"] += 1
        if verdict.problems:
            found.append(_keep(case, verdict.problems, failures, seed, counts["examples"]))

    one()
    return {"counts": dict(counts), "failures": found}


def _dtype(case: Any) -> Any:
    import numpy as np
    from onnx import helper

    return np.dtype(helper.tensor_dtype_to_np_dtype(case.model.graph.input[0].type.tensor_type.elem_type))


def _keep(case: Any, problems: list[str], failures: Path, seed: int, number: int) -> dict[str, Any]:
    failures.mkdir(parents=True, exist_ok=True)
    path = failures / f"graph-{seed}-{number}.onnx"
    path.write_bytes(case.model.SerializeToString())
    (failures / f"graph-{seed}-{number}.txt").write_text(
        f"{case.describe()}\noptions: {case.options}\nmust stay: {case.must_stay}\n" + "\n".join(problems) + "\n")
    return {"case": case.describe(), "problems": problems, "model": str(path)}


@dataclass
class GraphCampaign:
    counts: Counter[str]
    failures: list[dict[str, Any]]
    crashed_chunks: list[int]


def graph_campaign(examples: int, seed: int, chunk: int, failures: Path) -> GraphCampaign:
    counts: Counter[str] = Counter()
    found: list[dict[str, Any]] = []
    crashed = []
    for index, start in enumerate(range(0, examples, chunk)):
        size = min(chunk, examples - start)
        chunk_seed = seed * 100_000 + index
        completed = subprocess.run(
            [sys.executable, "-m", "tests.support.fuzz", "--graph-worker", "--examples", str(size),
             "--seed", str(chunk_seed), "--failures", str(failures)],
            capture_output=True, text=True, check=False)
        lines = completed.stdout.strip().splitlines()
        if completed.returncode != 0 or not lines:
            crashed.append(chunk_seed)
            found.append({"case": f"chunk seed {chunk_seed}", "problems": [
                f"the worker died (exit {completed.returncode}): {completed.stderr.strip()[-300:]}"]})
            continue
        result = json.loads(lines[-1])
        counts.update(result["counts"])
        found.extend(result["failures"])
        print(f"graphs: {start + size}/{examples}, {len(found)} failing", file=sys.stderr, flush=True)
    return GraphCampaign(counts, found, crashed)


# --- the document ------------------------------------------------------------------------------------

def render(results: dict[str, Any]) -> str:
    graphs, mutants = results["graphs"], results["bytes"]
    counts = Counter(graphs["counts"])
    lines = [
        "# Reliability: bad input, faults, fuzzing",
        "",
        "Generated by `python -m tests.support.fuzz` "
        f"(`--examples {results['examples']} --mutations {results['mutations']} --seed {results['seed']}`); "
        f"last run {results['date']} on {results['platform']}, in {results['seconds']:.0f} s. "
        "Do not edit by hand: change `tests/support/fuzz.py` and run it again. The raw figures are in "
        "`docs/reliability.json`.",
        "",
        "The quick profile of the same checks runs in the normal test suite (`tests/reliability/`): every "
        "bad input below through the command and the API, 1000 random graphs, 150 byte mutants in process and "
        "8 in the isolated worker, a full disk (patched writer and, as root, a 64 KiB tmpfs), SIGINT/SIGTERM "
        "during writes, and the per-pattern guard.",
        "",
        "## Bad input",
        "",
        "A refused input gets one line on stderr (`bnfold: error: …`), exit code 2, no traceback, and nothing "
        "at the destination changes; the API raises `bnfold.InputError` or `bnfold.OutputError`, never a bare "
        "protobuf, numpy or onnxruntime error. A *valid* model whose batch-norm statistics are unusable is not "
        "refused: that batch norm stays, with a reason code, and the rest folds (exit 0). Each row ran through "
        "the installed command in its own process; \"ok\" means every condition held (exit code, one line, "
        "message, no file written or changed, API exception).",
        "",
        "| category | bad input | exit | what bnfold says | API | ok |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["bad_inputs"]:
        if "skipped" in row:
            lines.append(f"| {row['category']} | {row['what']} | – | skipped: {row['skipped']} | – | – |")
            continue
        good = not row["problems"] and not row["api_problems"]
        verdict = "yes" if good else "**NO**: " + "; ".join(row["problems"] + row["api_problems"])
        lines.append(f"| {row['category']} | {row['what']} | {row['exit_code']} | {_cell(row['says'])} | "
                     f"{row['api']} | {_cell(verdict)} |")
    refusals = counts.get("left guard_rejected", 0)
    lines += [
        "",
        "## Faults",
        "",
        "- **Atomic writes.** Every ONNX output and its external data file is written to an unnamed file "
        "(`O_TMPFILE`) in the destination directory, fsynced, and linked and renamed over the destination "
        "(`core/atomic.AtomicFiles`); a model and its data file are put in place together with signals "
        "deferred, so an interrupt never splits the pair, and a kill during the write leaves nothing. PyTorch "
        "files, which torch writes to a path, go through a short named temporary (`.bnfold-*.tmp`) removed "
        "with signals deferred. No output may replace a file the input consists of (model file, external "
        "data files, under any name), nor a FIFO, device or socket. "
        "`tests/reliability/test_faults.py` sends SIGINT and SIGTERM to `bnfold fold` on a 25 MiB model, both "
        "the moment the write begins and at random times: the destination is always the old "
        "file or the complete new one, no temporary remains, and the command exits 128+signal with one line.",
        "- **Kills, second signals, vanishing inputs.** `tests/reliability/test_kills_and_truncation.py`: "
        "SIGKILL when the write begins and at random times leaves no temporary file and the destination old "
        "or complete; SIGINT/SIGTERM followed 0-20 ms later by another stop signal ends with one line and "
        "exit 130/143 (later stop signals are ignored while the first one's cleanup runs); an input truncated "
        "while it is read (SIGBUS through its memory map) ends with one line and exit 2, nothing written "
        "(`core/faults.py`: a C-level handler, since Python cannot turn SIGBUS into an exception).",
        "- **Disk full.** Simulated by a writer that stores half and fails with ENOSPC, by an fsync that "
        "fails, and (as root) by a 64 KiB tmpfs: `OutputError`, exit 2, the previous output intact.",
        "- **Per-pattern guard.** A folded model that fails `onnx.checker` (full check) or that onnxruntime "
        "cannot load while it loads the original is never written. bnfold refolds, at most once per fold, "
        "leaving the fold the complaint names or else keeping the folds one at a time, and leaves exactly "
        "those that break the model unfolded with reason `guard_rejected` and a message naming the pattern "
        "(the command also warns on stderr); a pattern that raises is contained the same way. If no set of "
        "rejections gives a valid model, it is an internal error (exit 3) and nothing is written. In this run "
        "the guard rejected "
        f"{refusals} fold(s) of {counts.get('batch norms', 0)} batch norms.",
        "",
        "## Random graphs",
        "",
        "Hypothesis draws chains and DAGs of Conv, ConvTranspose, Gemm, MatMul, BatchNormalization, Relu, "
        "Add/Mul/Sub/Div (by constants of every broadcast shape, either operand order, or of two values), Reshape "
        "and Flatten, with random groups, strides, dilations, pads, auto_pad, output_padding, transA/B, alpha, "
        "beta, C shapes; ranks 2-5; float32, float16, float64 (and float32 statistics in float16/float64 models); "
        "shared weights, fan-out, graph outputs in the middle, `If` branches reading outer weights, `If` branches "
        "that reuse value names at other ranks, model-local functions called at one or two ranks (their bodies "
        "reusing main-graph names), and `If` conditions fed as inputs, computed from data or from a shape. About "
        "one batch norm in seven is made unsafe (NaN or infinite statistics, negative variance, var + epsilon = 0, "
        "training mode, a parameter fed as a graph input or overridable). Some cases enable `standalone=\"mul-add\"` "
        "or `\"conv\"` or skip a pattern. Every example must: not crash, give a model `onnx.checker` accepts, "
        "compute the same outputs as the original under onnxruntime with optimizations off (onnx.reference where "
        "onnxruntime has no kernel; NaN/inf at the same places, finite values within bnfold's dtype tolerances), "
        "leave every unsafe batch norm in place and recorded as left, and be idempotent (a second fold folds "
        "nothing and changes no byte). Rounding the folded weights once is part of any exact fold, and an "
        "ill-conditioned graph (a constant divided by a value near zero) can amplify it past those tolerances; "
        "such a case, and every float16 case (whose tolerances would let a scale a few percent off through), is "
        "also judged exactly: the model widened to float64 is folded, and must compute what the widened original "
        "computes, to 1e-7.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| examples | {counts.get('examples', 0)} |",
        f"| examples no engine here can run (skipped) | {counts.get('generator unrunnable', 0)} |",
        f"| failing examples | {len(graphs['failures'])} |",
        f"| worker chunks that crashed | {len(graphs['crashed_chunks'])} |",
        f"| batch norms generated | {counts.get('batch norms', 0)} (unsafe on purpose: "
        f"{counts.get('unsafe batch norms', 0)}) |",
        f"| folded | {_breakdown(counts, 'folded ')} |",
        f"| left | {_breakdown(counts, 'left ')} |",
        f"| nodes | {_breakdown(counts, 'op ')} |",
        f"| engines | {_breakdown(counts, 'engine ')} |",
        f"| dtypes | {_breakdown(counts, 'dtype ')} |",
        f"| options | {_breakdown(counts, 'option ') or 'none'} |",
    ]
    lines += _failure_lines(graphs["failures"], "case")
    lines += [
        "",
        "## Byte mutants",
        "",
        "Mutations (truncate, flip bits, boundary bytes, splice from another model, repeat or delete a "
        "stretch, overlong varints) of the sample models in `models/` and of models built in code, one with "
        "its weights in an external data file (a mutation hits either file). Each mutant goes through "
        "`bnfold fold` (read, fold, guard, verify, write) in a worker process, replaced when it dies, so a "
        "crash in protobuf's or onnx's C++ code would count as a failure rather than end the run.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| mutants | {mutants['mutants']} |",
        f"| folded and written (exit 0) | {mutants['ok']} |",
        f"| refused with the one-line error (exit 2) | {mutants['refused']} |",
        f"| verification failed, nothing written (exit 1) | {mutants['not_equivalent']} |",
        f"| failures (crash, hang, traceback, exit 3, file written on failure) | {len(mutants['failures'])} |",
        f"| worker restarts | {mutants['worker_restarts']} |",
        "",
        "Exit 1 happens when a mutation makes weights so large that the original overflows to infinity where "
        "the folded model does not (or the reverse): the outputs differ, verification says so, and nothing is "
        "written, as it should.",
    ]
    lines += _failure_lines([{"case": f["mutant"], "problems": [f["failure"]]} for f in mutants["failures"]],
                            "case")
    lines += [
        "",
        "## Bugs found and fixed",
        "",
        "| found by | bug | fix |",
        "|---|---|---|",
        *(f"| {by} | {_cell(bug)} | {_cell(fix)} |" for by, bug, fix in BUGS_FOUND),
        "",
        "## Known limits",
        "",
        "- A model and its external data file are two renames: signals cannot split them, but a power loss "
        "or SIGKILL between the two can leave the new data file beside the old model.",
        "- Where onnxruntime has no kernel (float64 Conv/ConvTranspose, bfloat16), models are verified with "
        "onnx.reference, corrected by bnfold for the two operators found wrong (BatchNormalization-9..13, "
        "grouped ConvTranspose); any other onnx.reference bug would show as a verification failure (exit 1, "
        "nothing written) or, if it happened to hit both models alike, go unnoticed.",
        "- The guard checks the folded graph without its weights (large initializers declared as inputs), at any "
        "size; onnxruntime loads it only when a fold made a node whose operator and types the original has nowhere "
        "(a kernel onnxruntime may lack). Tensors kept on disk inside subgraphs or functions send the model to "
        "`onnx.checker` from a staged file, and to onnxruntime only when verifying.",
        "",
    ]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _breakdown(counts: Counter[str], prefix: str) -> str:
    items = sorted(((key[len(prefix):], value) for key, value in counts.items() if key.startswith(prefix)),
                   key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{name} {value}" for name, value in items)


def _failure_lines(failures: list[dict[str, Any]], key: str) -> list[str]:
    if not failures:
        return []
    lines = ["", "Failing examples of this run (models in `build/fuzz-failures/`):", ""]
    lines += [f"- {_cell(failure[key])}: {_cell('; '.join(failure['problems']))}" for failure in failures[:20]]
    if len(failures) > 20:
        lines.append(f"- … and {len(failures) - 20} more (see docs/reliability.json)")
    return lines


# --- main --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=5000, help="random graphs (default 5000)")
    parser.add_argument("--mutations", type=int, default=5000, help="byte mutants (default 5000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=1000, help="random graphs per worker process")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "reliability.md")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "reliability.json")
    parser.add_argument("--failures", type=Path, default=ROOT / "build" / "fuzz-failures")
    parser.add_argument("--graph-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.graph_worker:
        print(json.dumps(graph_chunk(args.examples, args.seed, args.failures)))
        return 0

    from tests.support.byte_fuzz import campaign

    started = time.perf_counter()
    print("bad inputs ...", file=sys.stderr, flush=True)
    rows = bad_input_rows()
    graphs = graph_campaign(args.examples, args.seed, args.chunk, args.failures)
    print("byte mutants ...", file=sys.stderr, flush=True)
    mutants = campaign(args.mutations, args.seed, isolated=True, keep_failures=args.failures)
    results = {
        "examples": args.examples, "mutations": args.mutations, "seed": args.seed,
        "date": time.strftime("%Y-%m-%d"), "seconds": time.perf_counter() - started,
        "platform": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, "
                    f"{_versions()}",
        "bad_inputs": rows,
        "graphs": {"counts": dict(sorted(graphs.counts.items())), "failures": graphs.failures,
                   "crashed_chunks": graphs.crashed_chunks},
        "bytes": mutants.to_dict(),
    }
    for path in (args.doc, args.results):
        path.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1, default=str) + "\n")
    args.doc.write_text(render(results))
    bad = [row for row in rows if row.get("problems") or row.get("api_problems")]
    print(f"wrote {os.path.relpath(args.doc)}: {len(bad)} bad-input problem(s), {len(graphs.failures)} failing "
          f"graph(s), {len(mutants.failures)} failing mutant(s)", file=sys.stderr)
    return 1 if bad or graphs.failures or mutants.failures else 0


def _versions() -> str:
    import onnx
    import onnxruntime

    return f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}"


if __name__ == "__main__":
    sys.exit(main())
