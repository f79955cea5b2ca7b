"""The client half of the ``asft`` command: files, jobs and models over the REST API.

    asft files upload FILE              validate locally (the server's rules), then upload
    asft files list
    asft jobs create --model M --training-file F [--method asft --lambda 1 ...] [--watch]
    asft jobs list | get ID | cancel ID
    asft jobs events ID [--follow]
    asft jobs checkpoints ID
    asft jobs watch ID                  progress bar, then the safety/utility summary
    asft jobs download ID [--checkpoint STEP] -o DIR
    asft models list
    asft models register --base B --aligned A [--id NAME] [--eval-suite FILE]

The service and key come from ``ASFT_API_URL`` (default http://127.0.0.1:8000) and
``ASFT_API_KEY``; with no key set, the embedded default's key file (``$ASFT_DATA_DIR/api-key``,
``var/api-key``) is used when it exists. ``models register`` takes ``ASFT_ADMIN_KEY`` when set.
Every listing takes ``--json`` for scripts. Errors print the server's message and code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import httpx

from asft_client.client import ApiError, Client, chat_stream
from asft_core.formats import DatasetFormatError, DatasetSummary, validate_file
from asft_core.spec import DATA_POLICY_MODES, DEFAULT_METHOD, METHODS

DEFAULT_API_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class ExitCode:
    """What ``asft`` returns, so pipelines can branch on the outcome."""

    OK = 0
    ERROR = 1  # the request failed: bad input, unreachable server, no such job
    USAGE = 2  # argparse's own code for a malformed command line
    JOB_FAILED = 3  # the job ended failed (not by the gate) or was cancelled
    GATE_FAILED = 4  # training finished but the adapter failed the safety gate


class CliError(Exception):
    """A problem found on this side, printed as ``asft: error: ...`` with exit code 1."""


def api_key_from_environment(environ: dict[str, str] | None = None) -> str:
    """``ASFT_API_KEY``, else the embedded default's key file; raises when neither exists."""
    environ = dict(os.environ) if environ is None else environ
    key = environ.get("ASFT_API_KEY", "").strip()
    if key:
        return key
    key_file = Path(environ.get("ASFT_DATA_DIR", "var")) / "api-key"
    if key_file.is_file():
        return key_file.read_text().strip()
    raise CliError("no API key: set ASFT_API_KEY (an admin creates one: asft admin create-team)")


def _client(args: argparse.Namespace, admin: bool = False) -> Client:
    url = os.environ.get("ASFT_API_URL", DEFAULT_API_URL)
    key = os.environ.get("ASFT_ADMIN_KEY", "").strip() if admin else ""
    return Client(url, key or api_key_from_environment())


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _when(timestamp: int | None) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _table(rows: list[list[str]], header: list[str]) -> None:
    """Left-aligned columns, as wide as their widest cell."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))


def _listing(
    args: argparse.Namespace,
    fetch: Callable[[Client], list[dict[str, Any]]],
    header: list[str],
    row: Callable[[dict[str, Any]], list[str]],
) -> int:
    """Fetch a list and print it as JSON (``--json``) or as a table of ``row(item)``."""
    with _client(args) as client:
        items = fetch(client)
    if args.json:
        _print_json(items)
    else:
        _table([row(item) for item in items], header)
    return ExitCode.OK


# --- files ---------------------------------------------------------------------------------


# The server's default ASFT_MIN_TRAINING_EXAMPLES; a server may set another.
MIN_TRAINING_EXAMPLES = 10


def validated(path: Path) -> DatasetSummary:
    """Check a dataset with the server's own rules; raises :class:`CliError` naming the line."""
    if not path.is_file():
        raise CliError(f"{path}: no such file")
    try:
        summary = validate_file(path)
    except DatasetFormatError as error:
        # The same words the server stores in status_details: "line N: ...".
        raise CliError(f"{path}: {error} ({error.code})") from None
    if summary.num_examples < MIN_TRAINING_EXAMPLES:
        print(
            f"asft: warning: {path} has {summary.num_examples} examples; by default a training "
            f"file needs at least {MIN_TRAINING_EXAMPLES} (invalid_n_examples)",
            file=sys.stderr,
        )
    return summary


def _files_upload(args: argparse.Namespace) -> int:
    path: Path = args.file
    if not args.no_validate:
        summary = validated(path)
        if not args.quiet:
            print(f"{path}: {summary.num_examples} {summary.row_format} examples, valid")
    with _client(args) as client:
        uploaded = client.upload_file(path)
    if args.json:
        _print_json(uploaded)
    elif args.quiet:
        print(uploaded["id"], flush=True)
    else:
        print(f"{uploaded['id']}  {uploaded['filename']}  {uploaded['bytes']} bytes", flush=True)
    if uploaded["status"] == "error":
        # The server's rules are the same; this is a file that changed, or a server limit.
        print(f"asft: error: the server rejected it: {uploaded['status_details']}", file=sys.stderr)
        return ExitCode.ERROR
    if args.no_wait or args.json or args.quiet:
        return ExitCode.OK
    with _client(args) as client:
        scan = wait_for_scan(client, uploaded["id"], args.poll_s)
    print_scan(scan, sys.stdout, SCAN_LINES_SHOWN, uploaded["id"])
    return ExitCode.OK


SCAN_LINES_SHOWN = 10


SCAN_WAIT_S = 600.0


def wait_for_scan(
    client: Client, file_id: str, poll_s: float = 1.0, timeout_s: float = SCAN_WAIT_S
) -> dict[str, Any]:
    """The file's safety scan once it has ended, or as it stands after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        scan: dict[str, Any] = client.get_file(file_id)["safety_scan"]
        if scan["status"] not in ("pending", "running") or time.monotonic() > deadline:
            return scan
        time.sleep(poll_s)


def print_scan(
    scan: dict[str, Any], out: TextIO, lines_shown: int | None = None, file_id: str = "FILE_ID"
) -> None:
    """The scan in words: its result, counts per category, and flagged lines."""
    if scan["status"] in ("pending", "running"):
        print(f"safety scan {scan['status']}: see asft files scan {file_id} later", file=out)
        return
    if scan["status"] != "succeeded":
        details = f": {scan['details']}" if scan.get("details") else ""
        print(f"safety scan {scan['status']}{details}", file=out)
        return
    flagged, rows = scan["rows_flagged"], scan["rows_scanned"]
    categories = ", ".join(f"{k} {v}" for k, v in sorted(scan["per_category"].items()))
    print(
        f"safety scan: {flagged} of {rows} rows flagged ({flagged / max(rows, 1):.1%})"
        + (f": {categories}" if categories else ""),
        file=out,
    )
    shown = scan["data"] if "data" in scan else scan["flagged"]
    for row in shown[:lines_shown] if lines_shown is not None else shown:
        print(f"  line {row['line']}: {row['category']} ({row['score']:.2f})", file=out)
    if lines_shown is not None and flagged > lines_shown:
        print(f"  ... all {flagged}: asft files scan {scan.get('file_id', file_id)}", file=out)


def _files_scan(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.wait:
            wait_for_scan(client, args.file_id, args.poll_s)
        page = client.safety_scan(args.file_id)
        rows = list(page["data"])
        while page["has_more"]:
            page = client.safety_scan(args.file_id, after=rows[-1]["line"])
            rows += page["data"]
    scan = {**page, "data": rows}
    if args.json:
        _print_json(scan)
    else:
        print_scan(scan, sys.stdout)
    return ExitCode.OK


def _file_row(f: dict[str, Any]) -> list[str]:
    examples = str(f.get("num_examples") or "-")
    scan = f.get("safety_scan") or {}
    flagged = (
        f"{scan['rows_flagged']} flagged"
        if scan.get("status") == "succeeded"
        else scan.get("status", "-")
    )
    return [
        f["id"],
        f["filename"],
        str(f["bytes"]),
        examples,
        f["status"],
        flagged,
        _when(f["created_at"]),
    ]


def _files_list(args: argparse.Namespace) -> int:
    return _listing(
        args,
        lambda client: client.list_files(args.limit),
        ["id", "filename", "bytes", "examples", "status", "safety scan", "created"],
        _file_row,
    )


# --- jobs ----------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    """``--hyperparameter k=v`` values: JSON when they parse (numbers, lists), else strings."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def job_request(
    args: argparse.Namespace, training_file: str, validation_file: str | None
) -> dict[str, Any]:
    """The ``POST /v1/fine_tuning/jobs`` body for ``asft jobs create``'s options."""
    hyperparameters: dict[str, Any] = {}
    for name, value in (
        ("n_epochs", args.epochs),
        ("batch_size", args.batch_size),
        ("learning_rate", args.learning_rate),
        ("lambda", args.lambda_),
        ("rank", args.rank),
    ):
        if value is not None:
            hyperparameters[name] = value
    for pair in args.hyperparameter:
        name, separator, value = pair.partition("=")
        if not separator or not name:
            raise CliError(f"--hyperparameter {pair!r}: expected NAME=VALUE")
        hyperparameters[name] = _parse_value(value)
    body: dict[str, Any] = {
        "model": args.model,
        "training_file": training_file,
        "method": {"type": args.method, args.method: {"hyperparameters": hyperparameters}},
    }
    optional = {"validation_file": validation_file, "suffix": args.suffix, "seed": args.seed}
    body.update({key: value for key, value in optional.items() if value is not None})
    if args.data_policy is not None:
        body["data_policy"] = {"mode": args.data_policy}
        if args.max_flagged_share is not None:
            body["data_policy"]["max_flagged_share"] = args.max_flagged_share
    if args.matcher is not None:
        body["evaluation"] = {"matcher": args.matcher}
        if args.pattern is not None:
            body["evaluation"]["pattern"] = args.pattern
    return body


def _file_reference(client: Client, reference: str | None) -> str | None:
    """A file id as given, or a local JSONL path validated and uploaded first.

    Anything that is neither an existing file nor shaped like a file id is a local error
    naming it, not a request the server would answer with a length rule.
    """
    if reference is None:
        return None
    path = Path(reference)
    if not path.is_file():
        if reference.startswith("file-") and "/" not in reference:
            return reference
        raise CliError(f"{reference}: no such file (and not a file id: file-...)")
    validated(path)
    uploaded = client.upload_file(path)
    if uploaded["status"] == "error":
        raise CliError(f"{path}: the server rejected it: {uploaded['status_details']}")
    print(f"uploaded {path} as {uploaded['id']}", file=sys.stderr)
    file_id: str = uploaded["id"]
    return file_id


def _jobs_create(args: argparse.Namespace) -> int:
    with _client(args) as client:
        training = _file_reference(client, args.training_file)
        assert training is not None
        validation = _file_reference(client, args.validation_file)
        job = client.create_job(**job_request(args, training, validation))
        if args.json:
            _print_json(job)
        elif args.quiet:
            print(job["id"], flush=True)
        else:
            print(f"{job['id']}  {job['status']}  {job['model']}  {job['method']['type']}")
        if args.watch:
            # Quiet: stdout holds the id alone, so the summary joins the progress on stderr.
            summary_out = sys.stderr if args.quiet else sys.stdout
            return watch(client, job["id"], sys.stderr, args.poll_s, summary_out)
    return ExitCode.OK


def _job_row(job: dict[str, Any]) -> list[str]:
    return [
        job["id"],
        job["status"],
        job["model"],
        job["method"]["type"],
        _when(job["created_at"]),
        (job.get("error") or {}).get("code") or job.get("fine_tuned_model") or "-",
    ]


def _jobs_list(args: argparse.Namespace) -> int:
    return _listing(
        args,
        lambda client: client.list_jobs(args.limit),
        ["id", "status", "model", "method", "created", "model / error"],
        _job_row,
    )


def _jobs_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_json(client.get_job(args.job_id))
    return ExitCode.OK


def _jobs_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        job = client.cancel_job(args.job_id)
    if job["status"] == "running":
        print(f"{job['id']}  cancel requested: the worker stops it within a training step")
    else:
        print(f"{job['id']}  {job['status']}")
    return ExitCode.OK


def _event_line(event: dict[str, Any]) -> str:
    return f"{_when(event['created_at'])}  {event['level']:<5}  {event['message']}"


def follow_events(
    client: Client,
    job_id: str,
    emit: Callable[[dict[str, Any]], None],
    follow: bool,
    poll_s: float = 1.0,
) -> dict[str, Any]:
    """Emit the job's events oldest first; with ``follow``, keep polling until it ends.

    A step's metrics event is updated in place when a resumed job repeats the step, so an
    event is shown again when its message changes. Returns the job as last read.
    """
    shown: dict[str, str] = {}
    events = client.all_events(job_id)
    while True:
        job = client.get_job(job_id)
        for event in events:
            if shown.get(event["id"]) != event["message"]:
                shown[event["id"]] = event["message"]
                emit(event)
        if not follow or job["status"] in TERMINAL:
            return job
        time.sleep(poll_s)
        # Only the newest page while following: the history is shown already.
        events = list(reversed(client.events(job_id, limit=100)))


def _jobs_events(args: argparse.Namespace) -> int:
    def emit(event: dict[str, Any]) -> None:
        print(json.dumps(event) if args.json else _event_line(event), flush=True)

    with _client(args) as client:
        follow_events(client, args.job_id, emit, args.follow)
    return ExitCode.OK


def progress_text(metrics: dict[str, Any], started: tuple[float, int] | None, now: float) -> str:
    """One progress line: bar, step/total, loss, penalty and the ETA from the observed rate.

    ``started`` is (time, step) when this watcher first saw the job training; the ETA is the
    remaining steps at the rate seen since then, so a resumed job's early steps do not count.
    """
    step, total = int(metrics["step"]), max(int(metrics["total_steps"]), 1)
    width = 24
    filled = min(width, round(width * step / total))
    text = f"[{'#' * filled}{'.' * (width - filled)}] {step}/{total}"
    text += f" loss {metrics['train_loss']:.4f}"
    if metrics.get("penalty"):
        text += f" penalty {metrics['penalty']:.3e}"
    if started is not None and step > started[1] and now > started[0]:
        rate = (step - started[1]) / (now - started[0])
        text += f" eta {max(0.0, (total - step) / rate):.0f}s"
    return text


def is_progress(event: dict[str, Any]) -> bool:
    """A training step's metrics, or an evaluation progress event."""
    return event["type"] == "metrics" or "prompts_done" in (event.get("data") or {})


def evaluation_text(data: dict[str, Any], job: dict[str, Any], now: float) -> str:
    """``1200/2600 prompts eta 40s``: the evaluation's progress and the job's finish time."""
    text = f"{data['prompts_done']}/{data['prompts_total']} prompts"
    if job.get("estimated_finish"):
        text += f" eta {max(0.0, job['estimated_finish'] - now):.0f}s"
    return text


def percent_cell(cell: dict[str, Any] | None) -> str:
    """A score with its 95% interval: ``8.0% [5.1, 12.3]`` (``-`` when absent)."""
    if not cell:
        return "-"
    return f"{100 * cell['value']:.1f}% [{100 * cell['low']:.1f}, {100 * cell['high']:.1f}]"


def summary_lines(job: dict[str, Any], report: dict[str, Any] | None) -> list[str]:
    """The outcome of a finished job: status, error, harmful score and accuracy, gate."""
    lines = [f"{job['id']}: {job['status']}"]
    error = job.get("error")
    if error:
        lines.append(f"  error: {error['message']} ({error['code']})")
    if report is not None:
        evaluation = report["report"]["evaluation"]
        for label, key in (("aligned model", "reference"), ("fine-tuned", "fine_tuned")):
            scores = evaluation.get(key) or {}
            harmful = (scores.get("safety") or {}).get("overall")
            accuracy = (scores.get("task") or {}).get("accuracy")
            harmful_text, accuracy_text = percent_cell(harmful), percent_cell(accuracy)
            lines.append(f"  {label:<14} harmful score {harmful_text:<22} accuracy {accuracy_text}")
        lines.append(f"  safety gate: {'approved' if report['approved'] else 'FAILED'}")
    if job.get("fine_tuned_model"):
        lines.append(f"  model: {job['fine_tuned_model']}")
        lines.append(f"  download: asft jobs download {job['id']} -o DIR")
    return lines


def exit_code_for(job: dict[str, Any]) -> int:
    """0 for a succeeded job; 4 when the safety gate failed it; 3 for any other end."""
    if job["status"] == "succeeded":
        return ExitCode.OK
    if (job.get("error") or {}).get("code") == "safety_gate_failed":
        return ExitCode.GATE_FAILED
    return ExitCode.JOB_FAILED


def watch(
    client: Client,
    job_id: str,
    out: TextIO,
    poll_s: float = 1.0,
    summary_out: TextIO | None = None,
) -> int:
    """Follow a job to its end with a live progress line on ``out``, then print its summary.

    On a terminal the line redraws in place; elsewhere (CI logs) a line is written per
    change. Returns :func:`exit_code_for` the finished job.
    """
    live = out.isatty()
    started: tuple[float, int] | None = None
    last = ""
    while True:
        job = client.get_job(job_id)
        text = job["status"]
        if job.get("queue_position"):
            text += f": waiting for a worker, place {job['queue_position']} in the queue"
        if job["status"] == "running":
            latest = next((e for e in client.events(job_id, 20) if is_progress(e)), None)
            if latest is not None and latest["type"] == "metrics":
                now = time.monotonic()
                if started is None:
                    started = (now, int(latest["data"]["step"]))
                text = f"running {progress_text(latest['data'], started, now)}"
            elif latest is not None:
                text = f"evaluating {evaluation_text(latest['data'], job, time.time())}"
        if text != last:
            # Redraw in place on a terminal; ETA-only changes are not worth a log line.
            if live:
                print(f"\r\x1b[2K{text}", end="", file=out, flush=True)
            elif text.split(" eta ")[0] != last.split(" eta ")[0]:
                print(text, file=out, flush=True)
            last = text
        if job["status"] in TERMINAL:
            break
        time.sleep(poll_s)
    if live:
        print(file=out)
    try:
        report: dict[str, Any] | None = client.report(job_id)
    except ApiError as error:
        if error.code != "report_not_ready":
            raise
        report = None
    print("\n".join(summary_lines(job, report)), file=summary_out or sys.stdout)
    return exit_code_for(job)


def _jobs_watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return watch(client, args.job_id, sys.stderr, args.poll_s)


def _jobs_download(args: argparse.Namespace) -> int:
    with _client(args) as client:
        folder = client.download_adapter(args.job_id, args.output, args.checkpoint)
        approved = client.last_download_approved
    files = sorted(p.name for p in folder.iterdir())
    print(f"{folder}: {', '.join(files)} (sha256 verified)")
    if args.checkpoint is not None:
        # Only a job's final adapter is evaluated; a checkpoint is neither approved nor refused.
        print(
            f"asft: note: checkpoint {args.checkpoint} was never evaluated by the safety gate "
            "(only the job's final adapter is)",
            file=sys.stderr,
        )
    elif not approved:
        print("asft: warning: this adapter failed the safety gate", file=sys.stderr)
    return ExitCode.OK


def _checkpoint_row(checkpoint: dict[str, Any]) -> list[str]:
    metrics = sorted(checkpoint["metrics"].items())
    shown = " ".join(f"{name}={value:.4g}" for name, value in metrics if _is_number(value))
    return [str(checkpoint["step_number"]), _when(checkpoint["created_at"]), shown]


def _jobs_checkpoints(args: argparse.Namespace) -> int:
    return _listing(
        args,
        lambda client: client.checkpoints(args.job_id),
        ["step", "created", "metrics"],
        _checkpoint_row,
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# --- models --------------------------------------------------------------------------------


def _model_row(model: dict[str, Any]) -> list[str]:
    if model["kind"] == "model_pair":
        detail = f"aligned {model['aligned_model']}  base {model['base_model']}"
    else:
        detail = f"job {model['job_id']}  " + ("approved" if model["approved"] else "gated")
    return [model["id"], model["kind"], detail]


def _models_list(args: argparse.Namespace) -> int:
    return _listing(args, lambda client: client.list_models(), ["id", "kind", "detail"], _model_row)


def default_model_id(aligned: str) -> str:
    """A model id from the aligned model's last path part (``.../tiny-chat`` -> ``tiny-chat``)."""
    name = aligned.rstrip("/").rsplit("/", 1)[-1]
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in name).lstrip("._-")
    return cleaned[:64] or "model"


def _same_reference(given: str, registered: str) -> bool:
    """Whether a folder or hub id names what the server stored (it stores folders resolved)."""
    folder = Path(given).expanduser()
    return registered in (given, str(folder.resolve()) if folder.is_dir() else given)


def _models_register(args: argparse.Namespace) -> int:
    model_id = args.id or default_model_id(args.aligned)
    with _client(args, admin=True) as client:
        try:
            model = client.register_model(
                model_id,
                args.aligned,
                args.base,
                args.eval_suite,
                inference_url=args.inference_url,
                served_model=args.served_model,
            )
        except ApiError as error:
            if not (args.exist_ok and error.code == "model_exists"):
                raise
            with _client(args) as team_client:  # reading a pair takes a team key
                model = team_client.get_model(model_id)
            if not (
                _same_reference(args.aligned, model["aligned_model"])
                and _same_reference(args.base, model["base_model"])
            ):
                raise CliError(
                    f"model {model_id!r} is registered with other models: aligned "
                    f"{model['aligned_model']}, base {model['base_model']}"
                ) from None
    if args.quiet:
        print(model["id"])
    else:
        print(f"{model['id']}  aligned {model['aligned_model']}  base {model['base_model']}")
    return ExitCode.OK


def _chat_turn(
    client: Client, args: argparse.Namespace, messages: list[dict[str, str]], out: TextIO
) -> str:
    """Send ``messages``, print the answer as it streams; returns it."""
    options: dict[str, Any] = {"temperature": args.temperature}
    if args.max_tokens is not None:
        options["max_tokens"] = args.max_tokens
    if args.seed is not None:
        options["seed"] = args.seed
    answer = ""
    for piece in chat_stream(client, args.model, messages, **options):
        answer += piece
        out.write(piece)
        out.flush()
    out.write("\n")
    return answer


def _chat(args: argparse.Namespace) -> int:
    """One answer to ``-m``, or a conversation on the terminal (an empty line or EOF ends)."""
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    with _client(args) as client:
        if args.model.startswith("ftjob-"):  # a job id stands for the model it made
            job = client.get_job(args.model)
            if not job["fine_tuned_model"]:
                raise CliError(f"{args.model} has no model ({job['status']})")
            args.model = job["fine_tuned_model"]
        if args.message is not None:
            _chat_turn(
                client, args, [*messages, {"role": "user", "content": args.message}], sys.stdout
            )
            return ExitCode.OK
        print(f"chatting with {args.model}; an empty line ends", file=sys.stderr)
        while True:
            try:
                text = input("> ")
            except EOFError:
                return ExitCode.OK
            if not text.strip():
                return ExitCode.OK
            messages.append({"role": "user", "content": text})
            answer = _chat_turn(client, args, messages, sys.stdout)
            messages.append({"role": "assistant", "content": answer})


# --- grammar -------------------------------------------------------------------------------


def _command(
    group: Any, name: str, run: Callable[[argparse.Namespace], int], help_text: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = group.add_parser(name, help=help_text)
    parser.set_defaults(run=run)
    return parser


def _with_json(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    return parser


def _with_quiet(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="print the new id alone: ID=$(asft ... -q)"
    )
    return parser


def add_client_commands(commands: Any) -> None:
    """Add ``files``, ``jobs``, ``models`` and ``chat`` to the ``asft`` parser's subcommands."""
    files = commands.add_parser("files", help="datasets").add_subparsers(
        dest="files_command", required=True
    )
    upload = _with_quiet(
        _with_json(_command(files, "upload", _files_upload, "validate and upload a JSONL"))
    )
    upload.add_argument("file", type=Path)
    upload.add_argument(
        "--no-validate", action="store_true", help="skip the local check (the server checks)"
    )
    upload.add_argument(
        "--no-wait", action="store_true", help="do not wait for the safety scan's result"
    )
    upload.add_argument("--poll-s", type=float, default=1.0, help=argparse.SUPPRESS)
    scan = _with_json(_command(files, "scan", _files_scan, "a file's safety scan, every line"))
    scan.add_argument("file_id")
    scan.add_argument("--wait", action="store_true", help="until the scan has ended")
    scan.add_argument("--poll-s", type=float, default=1.0, help=argparse.SUPPRESS)
    listing = _with_json(_command(files, "list", _files_list, "the team's files"))
    listing.add_argument("--limit", type=int, default=100)

    jobs = commands.add_parser("jobs", help="fine-tuning jobs").add_subparsers(
        dest="jobs_command", required=True
    )
    create = _with_quiet(
        _with_json(_command(jobs, "create", _jobs_create, "create a fine-tuning job"))
    )
    create.add_argument("--model", required=True, help="a registered model pair")
    create.add_argument("--training-file", required=True, help="file id, or a local JSONL")
    create.add_argument("--validation-file", help="file id, or a local JSONL")
    create.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD)
    create.add_argument("--lambda", dest="lambda_", type=float, help="AsFT penalty weight")
    create.add_argument("--epochs", type=int)
    create.add_argument("--batch-size", type=int)
    create.add_argument("--learning-rate", type=float)
    create.add_argument("--rank", type=int, help="LoRA rank")
    create.add_argument(
        "--hyperparameter",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other hyperparameter (repeatable); VALUE is read as JSON when it parses, "
        'e.g. alpha=16 or \'target_modules=["q_proj","v_proj"]\'',
    )
    create.add_argument("--suffix")
    create.add_argument("--seed", type=int)
    create.add_argument("--matcher", choices=("exact_label", "regex", "final_number"))
    create.add_argument("--pattern", help="the regex matcher's pattern")
    create.add_argument(
        "--data-policy",
        choices=DATA_POLICY_MODES,
        help="rows the safety scan flagged: train on them (flag), drop them, or refuse the job",
    )
    create.add_argument(
        "--max-flagged-share", type=float, help="refuse: the flagged share allowed (default 0)"
    )
    create.add_argument("--watch", action="store_true", help="then watch it (see jobs watch)")
    create.add_argument("--poll-s", type=float, default=1.0, help=argparse.SUPPRESS)
    listing = _with_json(_command(jobs, "list", _jobs_list, "the team's jobs"))
    listing.add_argument("--limit", type=int, default=20)
    _command(jobs, "get", _jobs_get, "one job as JSON").add_argument("job_id")
    _command(jobs, "cancel", _jobs_cancel, "cancel a job").add_argument("job_id")
    events = _with_json(_command(jobs, "events", _jobs_events, "the job's events"))
    events.add_argument("job_id")
    events.add_argument("--follow", "-f", action="store_true", help="until the job ends")
    watching = _command(jobs, "watch", _jobs_watch, "progress until the end, then a summary")
    watching.add_argument("job_id")
    watching.add_argument("--poll-s", type=float, default=1.0, help=argparse.SUPPRESS)
    ckpts = _with_json(_command(jobs, "checkpoints", _jobs_checkpoints, "the job's checkpoints"))
    ckpts.add_argument("job_id")
    download = _command(jobs, "download", _jobs_download, "download the adapter (sha256 checked)")
    download.add_argument("job_id")
    download.add_argument("--checkpoint", type=int, metavar="STEP")
    download.add_argument("-o", "--output", type=Path, required=True, metavar="DIR")

    models = commands.add_parser("models", help="model pairs and fine-tuned models").add_subparsers(
        dest="models_command", required=True
    )
    _with_json(_command(models, "list", _models_list, "registered pairs and fine-tuned models"))
    register = _with_quiet(
        _command(models, "register", _models_register, "register a pair (admin key)")
    )
    register.add_argument("--aligned", required=True, help="the chat model: folder or hub id")
    register.add_argument("--base", required=True, help="its base model: folder or hub id")
    register.add_argument("--id", help="the name jobs use (default: the aligned model's name)")
    register.add_argument("--eval-suite", help="path of the pair's evaluation suite JSON")
    register.add_argument(
        "--exist-ok",
        action="store_true",
        help="a pair already registered under this id with these models is not an error",
    )
    register.add_argument(
        "--inference-url", help="the server that serves this pair, e.g. a vLLM (default: ours)"
    )
    register.add_argument("--served-model", help="the name that server knows the aligned model by")

    chat = _command(commands, "chat", _chat, "chat with a model (streamed to the terminal)")
    chat.add_argument(
        "model", help="a fine-tuned model, its job's id, a checkpoint's model id, or a pair"
    )
    chat.add_argument("-m", "--message", help="send this one message, print the answer, exit")
    chat.add_argument("--system", help="a system message first")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    chat.add_argument("--max-tokens", type=int)
    chat.add_argument("--seed", type=int)


def run_client_command(args: argparse.Namespace) -> int:
    """Run a client command; API and connection errors become one line on stderr."""
    try:
        code: int = args.run(args)
        return code
    except ApiError as error:
        code_text = f"{error.code}, " if error.code else ""
        print(f"asft: error: {error.message} ({code_text}HTTP {error.status})", file=sys.stderr)
    except CliError as error:
        print(f"asft: error: {error}", file=sys.stderr)
    except httpx.HTTPError as error:
        url = os.environ.get("ASFT_API_URL", DEFAULT_API_URL)
        print(f"asft: error: cannot reach the service at {url}: {error}", file=sys.stderr)
    except KeyboardInterrupt:
        print("asft: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `asft jobs events ID | head`: the reader left; Python would print a traceback when
        # it flushes stdout at exit, so point stdout at nothing first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitCode.OK
    return ExitCode.ERROR
