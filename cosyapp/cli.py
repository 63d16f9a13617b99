"""The `cosyapp` command line: serve, models, speakers, prompts, synth, play.

Heavy imports (torch, the model stacks, uvicorn) happen inside the commands so `cosyapp --help` is instant.
Errors a user can fix (bad config, bad file, unknown speaker, unreachable service) exit with status 1 and
one clear message, without a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click

from cosyapp import __version__
from cosyapp.config import LM_WEIGHTS, PROJECT_ROOT, ConfigError, Settings, load_settings


@dataclass(frozen=True)
class HubModel:
    """Where a backend's official model directory is published, and which files of the repo it needs."""

    huggingface: str
    modelscope: str | None
    folder: str  # default folder name under pretrained_models/
    files: tuple[str, ...]  # download patterns: exactly the official layout, nothing else
    note: str = ""
    gated: bool = False  # needs a Hugging Face token of an account that accepted the licence


HUB_MODELS = {
    "cosyvoice2": HubModel(
        "FunAudioLLM/CosyVoice2-0.5B", "iic/CosyVoice2-0.5B", "CosyVoice2-0.5B",
        ("cosyvoice2.yaml", "llm.pt", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v2.onnx",
         "CosyVoice-BlankEN/*"),
    ),
    # The same id on both hubs. llm.rl.pt (RL-tuned weights in llm.pt's layout) is left out: nothing loads it.
    "cosyvoice3": HubModel(
        "FunAudioLLM/Fun-CosyVoice3-0.5B-2512", "FunAudioLLM/Fun-CosyVoice3-0.5B-2512", "Fun-CosyVoice3-0.5B",
        ("cosyvoice3.yaml", "llm.pt", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v3.onnx",
         "CosyVoice-BlankEN/*"),
    ),
    "fish": HubModel(
        "fishaudio/openaudio-s1-mini", None, "openaudio-s1-mini",
        ("config.json", "model.pth", "tokenizer.tiktoken", "special_tokens.json", "codec.pth"),
        note="gated: accept the licence on the Hugging Face model page, then set HF_TOKEN",
        gated=True,
    ),
}
# A file that marks a folder as a backend's layout (for `models list`).
LAYOUT_MARKERS = {"cosyvoice2": "cosyvoice2.yaml", "cosyvoice3": "cosyvoice3.yaml", "fish": "codec.pth"}
PRETRAINED_DIR = PROJECT_ROOT / "pretrained_models"


def _fail(message: str) -> click.ClickException:
    return click.ClickException(message)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can fix into a one-line `Error: ...` and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from cosyapp.client.http import ServiceError
        from cosyapp.client.player import PlayerUnavailable
        from cosyapp.engine.types import InputError, ModelFileError

        try:
            return command(*args, **kwargs)
        except (ConfigError, InputError, ModelFileError, ServiceError, PlayerUnavailable) as e:
            raise _fail(str(e)) from None

    return wrapper


config_option = click.option(
    "--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
    help="config file (default: $COSYAPP_CONFIG, else the project's config.toml)")


def _load_backend(settings: Settings):
    from cosyapp.engine.registry import load_backend

    model = settings.model
    click.echo(f"loading {model.backend} model from {model.model_dir} ...", err=True)
    return load_backend(model.backend, model.model_dir, model.device, model.dtype, max_streams=1,
                        **settings.backend_options())


def _read_prompt(settings: Settings, wav: Path):
    from cosyapp.audio import check_duration, read_audio_file

    samples, sample_rate = read_audio_file(wav)
    check_duration(samples, sample_rate, settings.limits.min_prompt_s, settings.limits.max_prompt_s, str(wav))
    return samples, sample_rate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cosyapp")
def main() -> None:
    """cosyapp: a streaming text-to-speech service (CosyVoice2, CosyVoice3, Fish) and its tools."""


# ----------------------------------------------------------------------------------------------- serve


@main.command()
@config_option
@click.option("--host", help="address to listen on (config: [server] host)")
@click.option("--port", type=click.IntRange(1, 65535), help="port (config: [server] port)")
@click.option("--backend", help="backend name (config: [model] backend)")
@click.option("--model-dir", type=click.Path(file_okay=False, path_type=Path),
              help="model directory (config: [model] model_dir)")
@click.option("--api-key", help="require 'Authorization: Bearer KEY' on every route but the health checks "
                                "(config: [server] api_key; COSYAPP_SERVER_API_KEY keeps it off the command line)")
@click.option("--ray", "on_ray", is_flag=True, help="deploy on a Ray Serve cluster as [cluster] says (replicas, "
              "GPUs, autoscaling) instead of running uvicorn here; needs the cluster extra")
@user_errors
def serve(config_file: Path | None, host: str | None, port: int | None, backend: str | None,
          model_dir: Path | None, api_key: str | None, on_ray: bool) -> None:
    """Run the HTTP service (POST /synthesize, the Fish Speech API /v1/*, GET /health, GET /model_info) with
    uvicorn, or with --ray as a Ray Serve deployment (every replica the same app)."""
    import uvicorn

    from cosyapp.allocator import restart_with_tcmalloc
    from cosyapp.engine.registry import backend_names
    from cosyapp.server import configure_logging, create_app
    from cosyapp.server.http_protocol import limited_protocol

    settings = load_settings(config_file)
    if backend is not None and backend not in backend_names():
        raise _fail(f"--backend: unknown backend {backend!r}; choose one of {', '.join(backend_names())}")
    server, model = settings.server, settings.model
    if host:
        server = dataclasses.replace(server, host=host)
    if port:
        server = dataclasses.replace(server, port=port)
    if api_key is not None:
        server = dataclasses.replace(server, api_key=api_key)
    if backend:
        model = dataclasses.replace(model, backend=backend)
    if model_dir:
        model = dataclasses.replace(model, model_dir=model_dir.resolve())
    settings = dataclasses.replace(settings, server=server, model=model)
    if on_ray:
        _serve_on_ray(settings)
        return
    if server.tcmalloc:
        allocator = restart_with_tcmalloc()  # returns only when it does not restart
    else:
        allocator = "memory allocator: the system's ([server] tcmalloc = false)"
    configure_logging(settings.server.log_level)
    click.echo(f"cosyapp {__version__}: serving {model.backend} from {model.model_dir} on "
               f"http://{server.host}:{server.port} (config: {settings.source or 'built-in defaults'}); {allocator}")
    # The asyncio loop whatever else is installed (uvicorn would pick uvloop when present: the dev extra's runpod
    # brings it), so the service's behaviour does not depend on the test tools installed; the HTTP protocol is
    # httptools' with the request-head limits (http_protocol.py).
    uvicorn.run(create_app(settings), host=server.host, port=server.port, log_config=None,
                log_level=server.log_level, access_log=False, timeout_graceful_shutdown=10, loop="asyncio",
                http=limited_protocol(server.header_timeout_s))


def _serve_on_ray(settings: Settings) -> None:
    try:
        from cosyapp.cluster import deployment
    except ImportError as e:
        raise _fail(f"--ray needs Ray Serve: pip install -e '.[cluster]' ({e})") from None
    from cosyapp.server import configure_logging

    configure_logging(settings.server.log_level)
    cluster, storage = settings.cluster, settings.storage
    click.echo(f"cosyapp {__version__}: deploying {settings.model.backend} on the Ray cluster at {cluster.address} "
               f"({cluster.min_replicas}-{cluster.max_replicas} replicas, {cluster.gpus_per_replica:g} GPU and "
               f"{cluster.cpus_per_replica:g} CPU each, store: {storage.shared_store or storage.data_dir})")
    deployment.run(settings, lambda url: click.echo(f"serving on {url} (Ctrl-C removes the deployment)"))


# ---------------------------------------------------------------------------------------------- models


@main.group()
def models() -> None:
    """Download, list, verify and fabricate model directories."""


@models.command("pull")
@click.argument("backend", type=click.Choice(sorted(HUB_MODELS)))
@click.option("--source", type=click.Choice(["hf", "modelscope"]), default="hf", show_default=True,
              help="hub to download from")
@click.option("--dir", "target", type=click.Path(file_okay=False, path_type=Path),
              help="where to put it (default: the configured model_dir for this backend, else "
                   "pretrained_models/<name>)")
@config_option
@user_errors
def models_pull(backend: str, source: str, target: Path | None, config_file: Path | None) -> None:
    """Download a model in its official layout (resumable), then verify it."""
    from cosyapp.engine.registry import verify_model_dir

    hub = HUB_MODELS[backend]
    settings = load_settings(config_file)
    if target is None:
        target = settings.served_backends().get(backend, PRETRAINED_DIR / hub.folder)
    target = target.resolve()
    if source == "hf":
        from huggingface_hub import get_token, snapshot_download
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

        # HF_TOKEN and `huggingface-cli login` are huggingface_hub's own (get_token); [hub] hf_token is ours.
        token = settings.hub.hf_token or None
        if hub.gated and token is None and get_token() is None:
            raise _fail(f"{hub.huggingface} is gated and no Hugging Face token is set: accept the licence at "
                        f"https://huggingface.co/{hub.huggingface} with your account, create a read token at "
                        "https://huggingface.co/settings/tokens, then set HF_TOKEN=hf_... (or [hub] hf_token in "
                        "config.toml, or run `huggingface-cli login`) and run this again")
        target.mkdir(parents=True, exist_ok=True)
        note = f" ({hub.note})" if hub.note else ""
        click.echo(f"downloading {hub.huggingface} from Hugging Face into {target}{note}")
        try:
            snapshot_download(hub.huggingface, local_dir=target, allow_patterns=list(hub.files), token=token)
        except GatedRepoError as e:
            raise _fail(f"{hub.huggingface} is gated ({hub.note}): {e}") from None
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
            raise _fail(f"download of {hub.huggingface} failed (run the command again to resume): {e}") from None
    else:
        if hub.modelscope is None:
            raise _fail(f"{backend} is published on Hugging Face only; use --source hf")
        target.mkdir(parents=True, exist_ok=True)
        from modelscope import snapshot_download as modelscope_download

        click.echo(f"downloading {hub.modelscope} from ModelScope into {target}")
        try:
            modelscope_download(hub.modelscope, local_dir=str(target), allow_patterns=list(hub.files))
        except Exception as e:  # modelscope raises assorted request/IO errors
            raise _fail(f"download of {hub.modelscope} failed (run the command again to resume): {e}") from None
    click.echo("verifying ...")
    for line in verify_model_dir(backend, target):
        click.echo(f"  {line}")
    click.echo(f"ok: {target}")


@models.command("list")
@config_option
@user_errors
def models_list(config_file: Path | None) -> None:
    """Show where each model is published and which model directories are present."""
    settings = load_settings(config_file)
    click.echo("Published models (cosyapp models pull BACKEND [--source hf|modelscope]):")
    for backend, hub in sorted(HUB_MODELS.items()):
        where = f"hf: {hub.huggingface}" + (f", modelscope: {hub.modelscope}" if hub.modelscope else "")
        click.echo(f"  {backend:<11} {where}" + (f"  [{hub.note}]" if hub.note else ""))
    click.echo(f"Local model directories in {PRETRAINED_DIR}:")
    found = False
    for folder in sorted(PRETRAINED_DIR.iterdir()) if PRETRAINED_DIR.is_dir() else []:
        layout = _layout(folder)
        if layout:
            found = True
            click.echo(f"  {folder.name:<24} {layout} layout")
    if not found:
        click.echo("  (none)")
    model = settings.model
    present = "present" if (model.model_dir / LAYOUT_MARKERS.get(model.backend, "")).is_file() else "MISSING"
    click.echo(f"Configured: backend={model.backend} model_dir={model.model_dir} ({present})")


def _layout(folder: Path) -> str | None:
    """The backend whose layout `folder` holds (its marker file), if any."""
    return next((name for name, marker in LAYOUT_MARKERS.items() if (folder / marker).is_file()), None)


@models.command("verify")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--backend", type=click.Choice(sorted(HUB_MODELS)),
              help="the model's backend  [default: the layout found in MODEL_DIR, else cosyvoice2]")
@user_errors
def models_verify(model_dir: Path, backend: str | None) -> None:
    """Check a model directory's official layout and that every file loads."""
    from cosyapp.engine.registry import verify_model_dir

    backend = backend or _layout(model_dir) or "cosyvoice2"
    for line in verify_model_dir(backend, model_dir):
        click.echo(line)
    click.echo(f"ok: {model_dir} is a valid {backend} model directory")


@models.command("make-tiny")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--backend", default="cosyvoice2", show_default=True, type=click.Choice(sorted(HUB_MODELS)))
@click.option("--size", type=click.Choice(["tiny", "full"]), default="tiny", show_default=True,
              help="tiny: a few MB for tests and demos; full: the real model's shapes for benchmarks")
@user_errors
def models_make_tiny(out_dir: Path, backend: str, size: str) -> None:
    """Write a RANDOM-weight model in the official layout (it speaks noise; for tests and benchmarks)."""
    from cosyapp.engine.registry import make_tiny

    make_tiny(backend, out_dir, size)
    click.echo(f"wrote a random {size} {backend} model to {out_dir} (not a trained model: output is noise)")


@models.command("build-trt")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--fp16/--fp32", default=True, show_default=True, help="engine precision")
@click.option("--max-streams", type=click.IntRange(1, 256), default=16, show_default=True,
              help="most streams whose flow steps share one engine call (batch = 2 x streams for CFG)")
@click.option("--max-frames", type=click.IntRange(4, 15000), default=3000, show_default=True,
              help="longest prompt + sentence in mel frames (50 per second)")
@click.option("--force", is_flag=True, help="rebuild even if a plan for this GPU exists")
@user_errors
def models_build_trt(model_dir: Path, fp16: bool, max_streams: int, max_frames: int, force: bool) -> None:
    """Build TensorRT engines of the CosyVoice2 flow estimator for this GPU and check them against torch.

    Two plans (full and chunk attention) are written into MODEL_DIR, named after the GPU and the TensorRT
    version; the service uses them when [cosyvoice2] tensorrt = true and they match this machine.
    """
    from cosyapp.accel.trt import build_trt, trt_unavailable_reason

    reason = trt_unavailable_reason()
    if reason:
        raise click.ClickException(f"cannot build TensorRT engines here: {reason}")
    for streaming in (False, True):
        plan = build_trt(model_dir, fp16=fp16, max_batch=2 * max_streams, streaming=streaming,
                         max_frames=max_frames, force=force)
        click.echo(f"{'chunk' if streaming else 'full'} attention: {plan} (checked against torch)")


# -------------------------------------------------------------------------------------------- speakers


@main.group()
def speakers() -> None:
    """Manage registered voices (used with the `speaker` field of /synthesize)."""


def _registry(settings: Settings):
    from cosyapp.storage import open_store

    return open_store(settings.storage).speakers  # the local disk, or the cluster's shared store


@speakers.command("add")
@click.argument("speaker_id")
@click.option("--wav", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="a clear 3-10 s recording of the voice (WAV, FLAC, OGG or MP3)")
@click.option("--text", help="transcript of the recording (enables zero-shot mode, the best cloning)")
@config_option
@user_errors
def speakers_add(speaker_id: str, wav: Path, text: str | None, config_file: Path | None) -> None:
    """Register a voice with its features precomputed."""
    from cosyapp.voices import make_voice_files, validate_speaker_id

    settings = load_settings(config_file)
    registry = _registry(settings)
    validate_speaker_id(speaker_id)
    if speaker_id in registry.ids():
        raise _fail(f"speaker {speaker_id!r} already exists; remove it first")
    samples, sample_rate = _read_prompt(settings, wav)
    files = make_voice_files(_load_backend(settings), samples, sample_rate, text.strip() if text else None,
                                {"source_file": wav.name})
    stored = registry.add(speaker_id, files)
    click.echo(f"added speaker {stored.id} ({files.meta['duration_s']:.1f} s"
               + (", with transcript" if files.text else ", no transcript: cross-lingual mode") + f") in {stored.path}")


@speakers.command("list")
@config_option
@user_errors
def speakers_list(config_file: Path | None) -> None:
    """List registered speakers."""
    registry = _registry(load_settings(config_file))
    ids = registry.ids()
    if not ids:
        click.echo(f"no speakers registered in {registry.root}")
        return
    for speaker_id in ids:
        stored = registry.get(speaker_id)
        text = stored.text or ""
        click.echo(f"{speaker_id:<24} {stored.meta.get('duration_s', 0):5.1f} s  "
                   f"{text[:40] + ('...' if len(text) > 40 else '')}")


@speakers.command("show")
@click.argument("speaker_id")
@config_option
@user_errors
def speakers_show(speaker_id: str, config_file: Path | None) -> None:
    """Show one speaker's metadata and transcript."""
    stored = _registry(load_settings(config_file)).get(speaker_id)
    click.echo(json.dumps({"id": stored.id, "path": str(stored.path), "text": stored.text, **stored.meta},
                          ensure_ascii=False, indent=2))


@speakers.command("remove")
@click.argument("speaker_id")
@config_option
@user_errors
def speakers_remove(speaker_id: str, config_file: Path | None) -> None:
    """Delete a speaker."""
    _registry(load_settings(config_file)).remove(speaker_id)
    click.echo(f"removed speaker {speaker_id}")


@speakers.command("rename")
@click.argument("old_id")
@click.argument("new_id")
@config_option
@user_errors
def speakers_rename(old_id: str, new_id: str, config_file: Path | None) -> None:
    """Rename a speaker."""
    _registry(load_settings(config_file)).rename(old_id, new_id)
    click.echo(f"renamed speaker {old_id} to {new_id}")


# --------------------------------------------------------------------------------------------- prompts


def _default_prompt(settings: Settings):
    from cosyapp.storage import open_store

    return open_store(settings.storage).default_prompt


@main.group()
def prompts() -> None:
    """The default prompt voice and instruction (used when a request names neither)."""


@prompts.command("set-default")
@click.option("--wav", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="the new default prompt voice recording")
@click.option("--instruction", help="also replace the default instruction (must end with <|endofprompt|>)")
@config_option
@user_errors
def prompts_set_default(wav: Path, instruction: str | None, config_file: Path | None) -> None:
    """Replace the default prompt voice (and optionally the instruction) without editing config.toml.

    A running service picks it up on its next request."""
    from cosyapp.voices import make_voice_files

    settings = load_settings(config_file)
    if instruction is not None and not instruction.strip().endswith("<|endofprompt|>"):
        raise _fail("--instruction must end with <|endofprompt|>")
    samples, sample_rate = _read_prompt(settings, wav)
    extra = {"source_file": wav.name, **({"instruction": instruction.strip()} if instruction else {})}
    files = make_voice_files(_load_backend(settings), samples, sample_rate, None, extra)
    stored = _default_prompt(settings).set(files)
    click.echo(f"default prompt set from {wav} ({files.meta['duration_s']:.1f} s), stored in {stored.path}")


@prompts.command("reset")
@config_option
@user_errors
def prompts_reset(config_file: Path | None) -> None:
    """Drop the prompt stored by set-default: the config's instruction and prompt_wav apply again."""
    settings = load_settings(config_file)
    if _default_prompt(settings).clear():
        click.echo("default prompt reset to the config's")
    else:
        click.echo("no default prompt was set; the config's is in use")


@prompts.command("show")
@config_option
@user_errors
def prompts_show(config_file: Path | None) -> None:
    """Show the default instruction and prompt voice in effect, and where each comes from."""
    settings = load_settings(config_file)
    stored = _default_prompt(settings).get()
    config = f"config ({settings.source or 'built-in defaults'})"
    if stored is not None and stored.meta.get("instruction"):
        click.echo(f"instruction: {stored.meta['instruction']}  [from prompts set-default]")
    else:
        click.echo(f"instruction: {settings.defaults.instruction or '(none: cross-lingual)'}  [from {config}]")
    if stored is not None:
        click.echo(f"prompt_wav:  {stored.wav_path} ({stored.meta.get('duration_s', 0):.1f} s, "
                   f"from {stored.meta.get('source_file', '?')})  [from prompts set-default]")
    else:
        path = settings.defaults.prompt_wav
        click.echo(f"prompt_wav:  {path}{'' if path.is_file() else ' (MISSING)'}  [from {config}]")


# ------------------------------------------------------------------------------------------ synth, play


def _client_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        click.option("--instruction", help="speaking style; ends with <|endofprompt|> (added when missing)"),
        click.option("--prompt-wav", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="voice to clone (uploaded)"),
        click.option("--prompt-text", help="transcript of --prompt-wav (zero-shot mode)"),
        click.option("--speaker", help="a registered speaker id instead of --prompt-wav"),
        click.option("--url", envvar="COSYAPP_URL",
                     help="service URL (default: $COSYAPP_URL, else http://127.0.0.1:<config port>)"),
        click.option("--api-key", envvar="COSYAPP_API_KEY",
                     help="bearer key of a service started with an API key (default: $COSYAPP_API_KEY)"),
        config_option,
    ]):
        command = option(command)
    return command


def _service_url(url: str | None, config_file: Path | None) -> str:
    return url or f"http://127.0.0.1:{load_settings(config_file).server.port}"


@main.command()
@click.argument("text")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="output file: .wav gets a WAV header, anything else is raw s16le PCM")
@_client_options
@user_errors
def synth(text: str, output: Path, instruction: str | None, prompt_wav: Path | None, prompt_text: str | None,
          speaker: str | None, url: str | None, api_key: str | None, config_file: Path | None) -> None:
    """Synthesize TEXT with a running service and save it, writing audio as it streams in."""
    import httpx

    from cosyapp.audio import wav_header
    from cosyapp.client.http import synthesize_stream

    url = _service_url(url, config_file)
    started = time.perf_counter()
    first_audio_s = None
    written = 0
    with synthesize_stream(url, text, instruction=instruction, prompt_text=prompt_text, prompt_wav=prompt_wav,
                           speaker=speaker, api_key=api_key) as audio, open(output, "wb") as f:
        is_wav = output.suffix.lower() == ".wav"
        if is_wav:
            f.write(wav_header(audio.sample_rate, audio.channels, 0))  # sizes patched below
        try:
            for chunk in audio.chunks:
                if first_audio_s is None:
                    first_audio_s = time.perf_counter() - started
                f.write(chunk)
                written += len(chunk)
        except httpx.HTTPError as e:
            raise _fail(f"the stream broke after {written} bytes: {e}") from None
        written -= written % (2 * audio.channels)  # a broken stream may end mid-sample
        f.truncate((44 if is_wav else 0) + written)
        if is_wav:
            f.seek(0)
            f.write(wav_header(audio.sample_rate, audio.channels, written))
    seconds = written / (2 * audio.channels * audio.sample_rate)
    click.echo(f"wrote {output}: {seconds:.2f} s at {audio.sample_rate} Hz "
               f"(first audio after {first_audio_s or 0:.2f} s, total {time.perf_counter() - started:.2f} s)")


@main.command()
@click.argument("text")
@click.option("--device", type=int, help="PyAudio output device index (default: the system default)")
@_client_options
@user_errors
def play(text: str, device: int | None, instruction: str | None, prompt_wav: Path | None, prompt_text: str | None,
         speaker: str | None, url: str | None, api_key: str | None, config_file: Path | None) -> None:
    """Synthesize TEXT with a running service and play it through PyAudio as the bytes arrive."""
    import httpx

    from cosyapp.client.http import synthesize_stream
    from cosyapp.client.player import PyAudioOutput, play_stream

    url = _service_url(url, config_file)
    with synthesize_stream(url, text, instruction=instruction, prompt_text=prompt_text, prompt_wav=prompt_wav,
                           speaker=speaker, api_key=api_key) as audio:
        output = PyAudioOutput(audio.sample_rate, audio.channels, device)
        try:
            seconds = play_stream(audio.chunks, audio.sample_rate, audio.channels, output=output)
        except httpx.HTTPError as e:
            raise _fail(f"the stream broke: {e}") from None
    click.echo(f"played {seconds:.2f} s of audio", err=True)



# ----------------------------------------------------------------------------------------------- bench


@click.group()
def bench() -> None:
    """Benchmarks: one backend in-process (engine), the HTTP service under concurrent load (service), the voice
    agent's streamed answers (agent)."""


def _report(text: str, report: Any, json_path: Path | None) -> None:
    """A benchmark's result: its table on stdout and, with --json, its numbers in that file."""
    click.echo(text)
    if json_path is not None:
        json_path.write_text(json.dumps(report, indent=2))


def _counts(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...]:
    """A comma-separated list of counts (concurrency levels, stream counts); none given: ()."""
    try:
        counts = tuple(int(part) for part in (value or "").split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated counts like 1,2,4,8; got {value!r}") from None
    if any(count < 1 for count in counts):
        raise click.BadParameter("counts must be >= 1")
    return counts


@bench.command("engine")
@click.option("--model-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="model directory (default: make a random model of --size)")
@click.option("--size", type=click.Choice(["tiny", "full"]), default="tiny", show_default=True,
              help="size of the random model")
@click.option("--backend", default="cosyvoice2", show_default=True, type=click.Choice(sorted(HUB_MODELS)))
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--prompt-wav", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="prompt recording (default: a synthetic tone)")
@click.option("--tokens", type=click.IntRange(1), default=100, show_default=True,
              help="LM tokens per request (fixed length)")
@click.option("--runs", type=click.IntRange(1), default=3, show_default=True)
@click.option("--long-tokens", type=click.IntRange(0), default=0, show_default=True,
              help="also profile one streaming request of this many LM tokens chunk by chunk (flow and vocoder "
                   "time per chunk along the utterance; 1100 = 44 s of audio); 0: off")
@click.option("--batch-streams", callback=_counts,
              help="cosyvoice2: also time the vocoding of this many streams at once, all in step, e.g. 1,2,4,8 "
                   "(per-stream cost and audio per second against the first count: what batching gains)")
@click.option("--flow-left-chunks", type=click.IntRange(-1),
              help="cosyvoice2/3 backend option flow_left_chunks: left context of streaming flow calls in chunks "
                   "(-1: all, exact; default: the backend's)")
@click.option("--lm-weights", type=click.Choice(LM_WEIGHTS),
              help="cosyvoice2/3 backend option lm_weights: the LM's transformer weights (default: the backend's)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="also write JSON here")
@click.option("--profile", "profile_path", type=click.Path(dir_okay=False, path_type=Path),
              help="also run one request under torch's profiler and write its busiest operators here")
@user_errors
def bench_engine(model_dir: Path | None, size: str, backend: str, device: str, dtype: str, prompt_wav: Path | None,
                 tokens: int, runs: int, long_tokens: int, batch_streams: tuple[int, ...],
                 flow_left_chunks: int | None, lm_weights: str | None, json_path: Path | None,
                 profile_path: Path | None) -> None:
    """Time to first chunk, real-time factor and per-stage times of one backend, in this process; with
    --long-tokens also the time of every streamed chunk along one long utterance, with --batch-streams the
    vocoding of several streams at once."""
    from cosyapp.bench import format_engine_report, run_engine_bench

    backend_options: dict[str, Any] = {}
    for option, value, hint in (("flow_left_chunks", flow_left_chunks, "--flow-left-chunks"),
                                ("lm_weights", lm_weights, "--lm-weights")):
        if value is not None:
            if backend not in ("cosyvoice2", "cosyvoice3"):
                raise click.BadParameter("only the CosyVoice backends have this option", param_hint=hint)
            backend_options[option] = value
    if batch_streams and backend != "cosyvoice2":
        raise click.BadParameter("only the cosyvoice2 backend batches streams' chunks", param_hint="--batch-streams")
    report = run_engine_bench(model_dir, size=size, backend_name=backend, device=device, dtype=dtype,
                              prompt_wav=prompt_wav, tokens=tokens, runs=runs, long_tokens=long_tokens,
                              batch_streams=batch_streams, backend_options=backend_options,
                              profile_path=profile_path)
    _report(format_engine_report(report), report, json_path)


@bench.command("agent")
@click.option("--url", help="benchmark this running service (with its own chat model) instead of starting one")
@click.option("--api-key", help="the running service's API key")
@click.option("--model-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="TTS model of the started service (default: a tiny random one: noise, but the real timing path)")
@click.option("--backend", default="cosyvoice2", show_default=True, type=click.Choice(sorted(HUB_MODELS)))
@click.option("--device", default="auto", show_default=True, help="device of the started service")
@click.option("--chat-url", help="OpenAI-compatible chat endpoint of the started service (default: a scripted "
              "one streaming a fixed four-sentence answer at --words-per-s)")
@click.option("--chat-model", default="", help="model name for --chat-url")
@click.option("--words-per-s", type=click.FloatRange(0.1), default=10.0, show_default=True,
              help="pace of the scripted chat model")
@click.option("--message", default=None, help="the user message (default: a fixed one)")
@click.option("--runs", type=click.IntRange(1), default=3, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="also write JSON here")
@user_errors
def bench_agent(url: str | None, api_key: str | None, model_dir: Path | None, backend: str, device: str,
                chat_url: str | None, chat_model: str, words_per_s: float, message: str | None, runs: int,
                json_path: Path | None) -> None:
    """Time to first text, time to first audio and per-sentence latency of streamed voice-agent answers (/run)."""
    from cosyapp.agent.bench import BENCH_MESSAGE, AgentBenchPlan, format_agent_report, run_agent_bench, \
        started_service

    settings = load_settings()
    plan = AgentBenchPlan(message or BENCH_MESSAGE, runs, settings.agent.min_sentence_chars,
                          settings.agent.max_sentence_chars)
    with contextlib.ExitStack() as stack:
        chat = "the service's own"
        if url is None:
            url, chat = stack.enter_context(started_service(model_dir, backend, device, chat_url, chat_model,
                                                            words_per_s))
        report = run_agent_bench(plan, url, chat, api_key)
    _report(format_agent_report(report), report, json_path)


@bench.command("decode")
@click.option("--model-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Fish model directory (default: make a random model of --size)")
@click.option("--size", type=click.Choice(["tiny", "full"]), default="tiny", show_default=True,
              help="size of the random model")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--rows", "row_counts", callback=_counts, default="1,2,4", show_default=True,
              help="numbers of streams decoded in step, one batched call per step, e.g. 1,2,4,8")
@click.option("--steps", type=click.IntRange(1), default=20, show_default=True, help="timed decode steps per count")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="also write JSON here")
@user_errors
def bench_decode(model_dir: Path | None, size: str, device: str, dtype: str, row_counts: tuple[int, ...],
                 steps: int, json_path: Path | None) -> None:
    """Batched decoding of the Fish model runner: decode steps per second and codec audio per second for
    several streams decoded in step, against the fewest (what batching gains)."""
    from cosyapp.bench_decode import format_decode_report, run_decode_bench

    report = run_decode_bench(model_dir, size=size, device=device, dtype=dtype, row_counts=row_counts, steps=steps)
    _report(format_decode_report(report), report, json_path)


@bench.command("lm")
@click.option("--model-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="model directory (default: make a random model of --size)")
@click.option("--size", type=click.Choice(["tiny", "full"]), default="full", show_default=True,
              help="size of the random model")
@click.option("--backend", default="cosyvoice2", show_default=True, type=click.Choice(["cosyvoice2", "cosyvoice3"]))
@click.option("--lm-weights", type=click.Choice(LM_WEIGHTS), default="int8", show_default=True,
              help="the LM weights compared with float32 (auto: what the service would pick on this CPU)")
@click.option("--rows", "row_counts", callback=_counts, default="1,8", show_default=True,
              help="rows of the timed batched decode steps")
@click.option("--tokens", type=click.IntRange(2), default=150, show_default=True,
              help="speech tokens sampled for the agreement measures")
@click.option("--steps", type=click.IntRange(1), default=20, show_default=True, help="timed decode steps per count")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of both samplers")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="also write JSON here")
@user_errors
def bench_lm(model_dir: Path | None, size: str, backend: str, lm_weights: str, row_counts: tuple[int, ...],
             tokens: int, steps: int, seed: int, json_path: Path | None) -> None:
    """A CosyVoice LM on the CPU, float32 against --lm-weights: decode steps and prefill, and how far the tokens
    agree (teacher-forced argmax and KL, free-running common prefix)."""
    from cosyapp.bench_lm import format_lm_report, run_lm_bench

    report = run_lm_bench(model_dir, size=size, backend=backend, lm_weights=lm_weights, row_counts=row_counts,
                          tokens=tokens, steps=steps, seed=seed)
    _report(format_lm_report(report), report, json_path)


@bench.command("chat")
@click.option("--device", default="cpu", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--tokens", type=click.IntRange(2), default=64, show_default=True, help="tokens a run (greedy)")
@click.option("--runs", type=click.IntRange(1), default=3, show_default=True)
@user_errors
def bench_chat(device: str, tokens: int, runs: int) -> None:
    """Load time and tokens per second of the voice agent's embedded chat model (SmolLM2-135M), in this process."""
    from cosyapp.agent.bench import format_embedded_chat_report, run_embedded_chat_bench

    click.echo(format_embedded_chat_report(run_embedded_chat_bench(device, tokens, runs)))


@bench.command("service")
@click.option("--url", help="benchmark this running service instead of starting one")
@config_option
@click.option("--model-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="model of the started service (config: [model] model_dir)")
@click.option("--backend", help="backend of the started service (config: [model] backend)")
@click.option("--device", help="device of the started service (config: [model] device)")
@click.option("--max-concurrent", type=click.IntRange(1), help="[engine] max_concurrent of the started service "
              "(default: the highest level)")
@click.option("--max-queue", type=click.IntRange(0), help="[engine] max_queue of the started service "
              "(default: max(16, --poisson-requests))")
@click.option("--levels", default="1,2,4,8,16", show_default=True, callback=_counts,
              help="closed-loop concurrency levels; empty: none")
@click.option("--requests", type=click.IntRange(1), default=4, show_default=True,
              help="requests per client at each closed-loop level")
@click.option("--fixed-length", type=click.IntRange(1), default=100, show_default=True,
              help="LM tokens per request (fixed_length: the stop token is ignored)")
@click.option("--text", default=None, help="text of every request (one sentence; default: a fixed English one)")
@click.option("--natural", is_flag=True, help="send texts of different lengths in turn without fixed_length, as "
              "real clients do (streams out of step); --text and --fixed-length are then unused")
@click.option("--poisson-rate", type=click.FloatRange(0), help="open-loop arrivals per second (default: "
              "0.7 x the best closed-loop request rate; 0: no open-loop run)")
@click.option("--poisson-requests", type=click.IntRange(1), default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the Poisson arrival times")
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True,
              help="uncounted requests before the first level")
@click.option("--api-key", envvar="COSYAPP_API_KEY", help="bearer token, when the service requires one")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="also write JSON here")
@click.option("--service-log", type=click.Path(dir_okay=False, path_type=Path),
              help="keep the started service's log here")
@click.option("--prompt-text", help="send this transcript of the default prompt voice with every request "
              "(zero-shot mode)")
@click.option("--service-checkout", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="start the service from this checkout of cosyapp (another version), measured by this client")
@user_errors
def bench_service(url: str | None, config_file: Path | None, model_dir: Path | None, backend: str | None,
                  device: str | None, max_concurrent: int | None, max_queue: int | None, levels: tuple[int, ...],
                  requests: int, fixed_length: int, text: str | None, natural: bool, poisson_rate: float | None,
                  poisson_requests: int, seed: int, warmup: int, api_key: str | None, json_path: Path | None,
                  service_log: Path | None, prompt_text: str | None, service_checkout: Path | None) -> None:
    """Load-test the HTTP service: closed-loop concurrency levels, then Poisson arrivals. Prints a table of
    first-audio p50/p95/p99, real-time factor, audio seconds per second and playback underruns."""
    from cosyapp.bench import BENCH_TEXT
    from cosyapp.bench_service import BenchError, LoadPlan, LocalService, format_service_report, run_service_bench

    plan = LoadPlan(text=text or BENCH_TEXT, fixed_length=fixed_length, levels=levels, requests_per_client=requests,
                    poisson_rate=poisson_rate, poisson_requests=poisson_requests, seed=seed, warmup=warmup,
                    natural=natural, prompt_text=prompt_text)
    service = None
    if url is None:
        service = LocalService(config=config_file, model_dir=model_dir, backend=backend, device=device,
                               max_concurrent=max_concurrent, max_queue=max_queue, log_path=service_log,
                               checkout=service_checkout)
        click.echo("starting the service ...", err=True)
    try:
        report = run_service_bench(plan, url=url, service=service, api_key=api_key)
    except BenchError as e:
        raise _fail(str(e)) from None
    _report(format_service_report(report), report, json_path)


@bench.command("robustness")
@click.option("--fuzz-cases", type=click.IntRange(1), default=5000, show_default=True,
              help="generated requests and live sessions over every route")
@click.option("--disconnects", type=click.IntRange(1), default=200, show_default=True,
              help="random client disconnects of the storm")
@click.option("--kill-rounds", type=click.IntRange(1), default=20, show_default=True,
              help="kill -9 rounds during voice adds and async tasks")
@click.option("--soak-minutes", type=click.FloatRange(0.1), default=10.0, show_default=True,
              help="length of the steady mixed load (RSS measured after its first minute)")
@click.option("--only", "parts", multiple=True, type=click.Choice(["fuzz", "disconnects", "crashes", "soak"]),
              help="run only these parts (repeatable; default: all)")
@click.option("--models", "models_dir", type=click.Path(file_okay=False, path_type=Path),
              help="folder of the tiny models the services run (made there if missing; default: a temporary one)")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the corpus and the random moments")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="also write JSON here")
@user_errors
def bench_robustness(fuzz_cases: int, disconnects: int, kill_rounds: int, soak_minutes: float,
                     parts: tuple[str, ...], models_dir: Path | None, seed: int, json_path: Path | None) -> None:
    """The robustness campaign on services it starts (CosyVoice2 + Fish on tiny models): a generated fuzz corpus
    over every route and the live socket, a disconnect storm, kill -9 rounds and a soak. Prints each part's
    figures and whether it holds; exits 1 when one does not."""
    from cosyapp.robustness.campaign import PARTS, CampaignPlan, campaign_ok, format_report, run_campaign, write_json

    plan = CampaignPlan(fuzz_cases=fuzz_cases, disconnects=disconnects, kill_rounds=kill_rounds,
                        soak_minutes=soak_minutes, parts=parts or PARTS, seed=seed)
    report = run_campaign(plan, models_dir)
    click.echo(format_report(report))
    if json_path is not None:
        write_json(report, json_path)
    if not campaign_ok(report):
        raise SystemExit(1)


@bench.command("cluster")
@config_option
@click.option("--model-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="model of the replicas (config: [model] model_dir)")
@click.option("--backend", help="backend of the replicas (config: [model] backend)")
@click.option("--device", default="cpu", show_default=True, help="device of the replicas")
@click.option("--replicas", default="1,2", show_default=True, callback=_counts,
              help="replica counts, benchmarked one after the other")
@click.option("--cores", type=click.IntRange(1), default=os.cpu_count(), show_default=True,
              help="CPU cores given to Ray, shared out equally between the replicas")
@click.option("--gpus-per-replica", type=click.FloatRange(0), default=0.0, show_default=True)
@click.option("--slots", type=click.IntRange(1), help="synthesis slots in all, shared out between the replicas "
              "(default: the highest level)")
@click.option("--levels", default="8", show_default=True, callback=_counts, help="closed-loop concurrency levels")
@click.option("--requests", type=click.IntRange(1), default=4, show_default=True,
              help="requests per client at each level")
@click.option("--fixed-length", type=click.IntRange(1), default=100, show_default=True,
              help="LM tokens per request (fixed_length)")
@click.option("--natural", is_flag=True, help="texts of different lengths without fixed_length (see bench service)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="also write JSON here")
@user_errors
def bench_cluster(config_file: Path | None, model_dir: Path | None, backend: str | None, device: str,
                  replicas: tuple[int, ...], cores: int, gpus_per_replica: float, slots: int | None,
                  levels: tuple[int, ...], requests: int, fixed_length: int, natural: bool,
                  json_path: Path | None) -> None:
    """Load-test Ray Serve deployments of 1, 2, ... replicas on this machine with the same cores and slots in
    all (needs the cluster extra): bench service's table per run, then throughput against the first run."""
    try:
        from cosyapp.cluster.bench import format_cluster_report, run_cluster_bench
    except ImportError as e:
        raise _fail(f"bench cluster needs Ray Serve: pip install -e '.[cluster]' ({e})") from None
    from cosyapp.bench_service import LoadPlan

    if not levels:
        raise _fail("--levels: give at least one level")
    settings = load_settings(config_file)
    model = dataclasses.replace(settings.model, device=device, **({"backend": backend} if backend else {}),
                                **({"model_dir": model_dir.resolve()} if model_dir else {}))
    settings = dataclasses.replace(settings, model=model)
    plan = LoadPlan(fixed_length=fixed_length, levels=levels, requests_per_client=requests, poisson_rate=0,
                    natural=natural)
    reports = run_cluster_bench(settings, plan, replicas, cores, gpus_per_replica, slots or max(levels))
    _report(format_cluster_report(reports), reports, json_path)


@bench.command("device-check")
@click.option("--cosyvoice2-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="CosyVoice2 model directory to check")
@click.option("--fish-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Fish (OpenAudio S1-mini) model directory to check")
@click.option("--device", default="cuda", show_default=True, help="device checked against the CPU")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="also write JSON here")
@user_errors
def bench_device_check(cosyvoice2_dir: Path | None, fish_dir: Path | None, device: str,
                       json_path: Path | None) -> None:
    """Outputs on DEVICE (at its serving precision) against CPU float32, stage by stage on the same inputs,
    each within a stated tolerance. Exits 1 when a stage is out of tolerance."""
    from cosyapp.device_check import format_device_check, run_device_check

    if cosyvoice2_dir is None and fish_dir is None:
        raise click.UsageError("give --cosyvoice2-dir, --fish-dir or both")
    report = run_device_check(cosyvoice2_dir, fish_dir, device)
    _report(format_device_check(report), report, json_path)
    if not report["passed"]:
        raise SystemExit(1)


@bench.command("summary")
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="also write JSON here")
def bench_summary(folder: Path, json_path: Path | None) -> None:
    """Summarize a folder of benchmark results written by scripts/gpu_bench.sh (device check, engine, load levels)."""
    from cosyapp.bench_summary import format_summary, summarize_dir

    summary = summarize_dir(folder)
    _report(format_summary(summary), summary, json_path)


main.add_command(bench)
