"""The ``onnxprune`` command: argument parsing and dispatch only.

Each subcommand lives in ``onnxprune.commands.<name>`` as ``run(args) -> int`` and calls library
functions; nothing here knows how pruning works. Every error becomes one line on stderr and an exit code:
2 for input the user must change, 1 for everything else (internal errors say so and ask for a report).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from traceback import print_exception

from onnxprune.errors import USER_ERRORS, OnnxpruneError, is_internal
from onnxprune.spec import (
    ALLOCATIONS,
    CRITERIA,
    DEPTH_METHODS,
    DEVICES,
    HEADS,
    LOSSES,
    OPTIMIZERS,
    QUANT_CALIBRATIONS,
    QUANTIZE_MODES,
)


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors exit 2 with one line (argparse prints the whole usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"onnxprune: error: {message} (see 'onnxprune {self.prog.split()[-1]} --help')\n")


def _add_scale_out_args(p: argparse.ArgumentParser) -> None:
    """``serve`` options for running as one replica of a fleet (docs/deploy.md); the defaults stay embedded."""
    g = p.add_argument_group("scale-out (defaults: local worker processes, SQLite and blobs under --store)")
    g.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: jobs run in worker processes of this server; ray: each job is a Ray task on the "
                        "cluster at --ray-address (needs the ray extra)")
    g.add_argument("--ray-address", metavar="HOST:PORT",
                   help="Ray head node (GCS) address; default: the cluster this machine joined with `ray start`, "
                        "else a private single-node Ray instance")
    g.add_argument("--ray-cpus-per-job", type=float, default=1.0, metavar="N",
                   help="CPUs a CPU job asks Ray for (device=cuda jobs ask for one GPU instead)")
    g.add_argument("--ray-jobs-per-worker", type=int, default=1, metavar="N",
                   help="jobs a Ray worker process runs before it exits: 1 (default) gives each job a fresh process "
                        "whose memory goes back to the OS; more saves the ~1 s worker start per job")
    g.add_argument("--ray-max-retries", type=int, default=0, metavar="N",
                   help="times Ray re-runs a job whose worker node died; 0 marks it FAILED with the reason")
    g.add_argument("--store-url", metavar="URL",
                   help="job database: sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DB (shared by "
                        "replicas; needs the postgres extra); default: sqlite in --store")
    g.add_argument("--blob-dir", metavar="DIR|URL",
                   help="blob store: a folder (on shared storage for several replicas) or an fsspec URL such as "
                        "s3://bucket/prefix; default: blobs in --store. --store keeps scratch and caches")
    g.add_argument("--heartbeat", type=float, default=2.0, metavar="S",
                   help="with a shared database: seconds between this replica's heartbeats and queue polls")
    g.add_argument("--replica-timeout", type=float, default=20.0, metavar="S",
                   help="with a shared database: a replica silent this long counts as dead; its jobs are "
                        "taken back by the others")
    g.add_argument("--max-attempts", type=int, default=2, metavar="N",
                   help="with a shared database: runs a job may get when replicas running it die (2: re-run once)")


def _add_server_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--server", metavar="HOST:PORT", required=required, help="run on a remote onnxprune service")
    p.add_argument("--token", help="bearer token for the service")
    p.add_argument("--tls-ca", metavar="PEM", help="CA certificate to verify the service's TLS certificate")
    p.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS")
    p.add_argument("--tls-key", metavar="PEM", help="client key for mutual TLS")


def _add_prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="input ONNX model")
    p.add_argument("-o", "--output", required=True, help="where to write the pruned model")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of channels to remove per group (default 0.5)")
    p.add_argument("--criterion", choices=CRITERIA, default="l2")
    p.add_argument("--global", dest="global_ranking", action="store_true", help="rank channels across groups")
    p.add_argument("--target-macs", type=float, help="keep this fraction of the original MACs")
    p.add_argument("--target-params", type=float, help="keep this fraction of the original parameters")
    p.add_argument("--target-latency", type=float, help="keep this fraction of the original latency")
    p.add_argument("--allocation", choices=ALLOCATIONS, default="auto",
                   help="how a budget spreads the cut: uniform (the same share of every group), global (scores "
                        "ranked across groups), measured (greedy, measured on the data); auto: measured with data, "
                        "else global")
    p.add_argument("--round-to", type=int, default=1, help="keep channel counts multiples of N")
    p.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN", help="node names (glob) to leave intact")
    p.add_argument("--granularity", default="channel", help="channel, element or N:M (e.g. 2:4)")
    p.add_argument("--sparsity", type=float, help="fraction of zeros for element / N:M granularity")
    p.add_argument("--depth", type=int, default=0, help="remove the K least important residual blocks")
    p.add_argument("--depth-method", choices=DEPTH_METHODS, default="ratio",
                   help="block importance: |f(x)|/|x| (ratio) or the output change without the block (fidelity)")
    p.add_argument("--heads", choices=HEADS, default="whole",
                   help="attention: remove whole heads, or the same dims of every head")
    p.add_argument("--prune-lm-hidden", action="store_true",
                   help="language models: also cut the hidden size (the residual stream), not only heads and MLP")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=1x3x224x224",
                   help="fix symbolic input dims (a dim may be 0, e.g. a KV cache's past length)")
    p.add_argument("--calib", metavar="DATA", help=".npz, a directory of .npz, or 'random'")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--reconstruct", action="store_true", help="refit the next layer by least squares")
    p.add_argument("--no-feature-distill", dest="feature_distill", action="store_false",
                   help="distil (fine-tuning without labels) from the original's outputs only, not also from four of "
                        "its block/stage outputs (their kept channels)")
    p.add_argument("--finetune-steps", type=int, default=0)
    p.add_argument("--train-data", metavar="DATA")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--iterations", type=int, default=1, help="prune in K steps with fine-tuning between")
    _add_metric_args(p)
    p.add_argument("--max-drop", type=float, metavar="X",
                   help="find the smallest MACs budget whose metric stays within X points (0.01 of the metric's "
                        "value: 1.0 = one percentage point of accuracy) of the original; needs --eval-data")
    _add_quantize_args(p)
    p.add_argument("--report", metavar="REPORT.json", help="write the JSON report here")
    p.add_argument("--bench", action="store_true", help="measure latency before and after")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--seed", type=int, default=0)
    _add_server_args(p)


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default="none",
                   help="quantize the pruned (and fine-tuned) model last: int8 (static QDQ, per-channel, needs "
                        "--calib DATA), int8-dynamic, fp16")
    p.add_argument("--quant-calibration", choices=QUANT_CALIBRATIONS, default="minmax",
                   help="how int8 turns calibration activations into ranges")
    p.add_argument("--quant-exclude", nargs="+", default=[], metavar="PATTERN",
                   help="node names (glob) to leave in float")
    p.add_argument("--keep-io-types", type=_bool, default=True, metavar="true|false",
                   help="fp16: keep float32 model inputs and outputs (default true)")
    p.add_argument("--quant-max-drop", type=float, metavar="X",
                   help="accuracy guard: keep the most sensitive layers in float until quantization loses at most X "
                        "points against its FP32 input (measured on --eval-data, else agreement on --calib)")


def _add_metric_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-data", metavar="DATA", help=".npz or a directory of .npz (labels optional) to measure the "
                   "task metric on")
    p.add_argument("--metric", metavar="METRIC",
                   help="top1, agreement, kl, cosine, ctc (character accuracy of a CTC recogniser against labels [N, L] "
                        "of character indices padded with -1), perplexity (LM logits on the data's input_ids, each "
                        "position scored on the next token) or python:MODULE:FUNC (default: top1 when the data "
                        "has labels, else agreement with the original); every value is higher-is-better, kl is "
                        "reported as -KL, perplexity as -ln(perplexity) with the perplexity beside it (so "
                        "--max-drop X allows perplexity to grow by a factor exp(X/100))")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxprune", description="Structured pruning of ONNX models.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    _add_prune_args(sub.add_parser("prune", help="prune a model"))

    p = sub.add_parser("analyze", help="list the channel dependency groups")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=1x3x224x224")
    _add_server_args(p)

    p = sub.add_parser("sensitivity", help="prune each group alone at a sweep of ratios")
    p.add_argument("model")
    p.add_argument("--calib", required=True, metavar="DATA")
    p.add_argument("-o", "--output", metavar="SENS.json")
    p.add_argument("--plot", metavar="SENS.png")
    p.add_argument("--criterion", choices=CRITERIA, default="l2")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=1x3x224x224")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN", help="node names (glob) to leave intact")
    p.add_argument("--heads", choices=HEADS, default="whole",
                   help="attention: scan whole heads, or the same dims of every head")
    _add_metric_args(p)

    p = sub.add_parser("export-artifacts", help="write training artifacts for a model")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, metavar="DIR")
    p.add_argument("--loss", choices=LOSSES, default="ce")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=1x3x224x224")

    p = sub.add_parser("apply-checkpoint", help="write an inference model with trained parameters")
    p.add_argument("model", help="the model the artifacts were exported from")
    p.add_argument("checkpoint", help="checkpoint.npz or an artifacts directory")
    p.add_argument("-o", "--output", required=True)

    p = sub.add_parser("finetune", help="fine-tune a model on onnxruntime")
    p.add_argument("model")
    p.add_argument("--train-data", required=True, metavar="DATA")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--teacher", metavar="MODEL", help="distil from this model when the data has no labels")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("serve", help="run the gRPC compression service",
                       description="Run the gRPC compression service until SIGTERM. Embedded by default (local "
                                   "worker processes, SQLite and blobs under --store); see docs/deploy.md for a "
                                   "cluster of replicas with Ray, PostgreSQL and object storage.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=50051, help="port to listen on; 0 picks a free one (printed)")
    p.add_argument("--store", default="./onnxprune-store", metavar="DIR",
                   help="folder for the job database, blobs and job scratch space (default ./onnxprune-store)")
    p.add_argument("--workers", type=int, default=2,
                   help="jobs run at once: local worker processes, or with --executor ray jobs this server keeps "
                        "on the cluster")
    p.add_argument("--token-file", metavar="F",
                   help="bearer tokens, one 'TENANT TOKEN' (or 'TOKEN') a line; without it: no auth")
    p.add_argument("--tls-cert", metavar="C", help="server certificate (PEM) for TLS")
    p.add_argument("--tls-key", metavar="K", help="server private key (PEM) for TLS")
    p.add_argument("--tls-client-ca", metavar="CA", help="CA bundle (PEM) clients' certificates must chain to (mTLS)")
    p.add_argument("--retention-hours", type=float, default=168.0,
                   help="hours finished jobs' results are kept before they expire")
    p.add_argument("--quota-gb", type=float, default=50.0, help="total size of stored blobs; uploads over it are refused")
    p.add_argument("--max-upload-gb", type=float, default=8.0, help="largest single upload accepted")
    p.add_argument("--max-tensor-gb", type=float, help="largest declared tensor accepted (default: --max-upload-gb)")
    p.add_argument("--queue-size", type=int, default=256, help="jobs waiting beyond the workers")
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds running jobs get on SIGTERM")
    p.add_argument("--allow-metric-module", action="append", default=[], metavar="MODULE",
                   help="let jobs use --metric python:MODULE:FUNC from this module (repeat for more); without it "
                        "the service refuses python: metrics, which would run client-chosen code on the server")
    _add_scale_out_args(p)

    p = sub.add_parser("jobs", help="list, show, cancel or fetch jobs on a service")
    p.add_argument("action", choices=("list", "show", "cancel", "fetch"))
    p.add_argument("job_id", nargs="?")
    p.add_argument("-o", "--output", metavar="OUT")
    _add_server_args(p, required=True)

    p = sub.add_parser("bench", help="measure onnxruntime latency of one model or two side by side")
    p.add_argument("model")
    p.add_argument("other", nargs="?")
    p.add_argument("--device", choices=DEVICES, default="auto")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=1x3x224x224")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("onnxprune").setLevel(min(level, logging.INFO))
    try:
        module = importlib.import_module(f"onnxprune.commands.{args.command.replace('-', '_')}")
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("onnxprune: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure ends as one line on stderr and an exit code
        return _fail(e, traceback=args.verbose >= 2)


def _fail(exc: Exception, *, traceback: bool = False) -> int:
    """Print one line for ``exc`` on stderr; return 2 for what the user must change, 1 for anything else.

    Internal errors (onnxprune's own bugs, see :func:`onnxprune.errors.is_internal`) say so, because telling a
    user to fix an input that was fine sends them the wrong way; ``-vv`` adds the traceback for the report.
    """
    if is_internal(exc):
        what = str(exc) if isinstance(exc, OnnxpruneError) else f"{type(exc).__name__}: {exc}"
        what = " ".join(what.split())  # one line, whatever a runtime put in its message
        if traceback:
            print_exception(exc, file=sys.stderr)
        print(f"onnxprune: internal error: {what}; please report it (-vv shows the traceback)", file=sys.stderr)
        return 1
    print(f"onnxprune: error: {exc}", file=sys.stderr)
    return 2 if isinstance(exc, USER_ERRORS) else 1


if __name__ == "__main__":
    sys.exit(main())
