"""The cURL examples of seed 004 (`shared/seeds/004_67245d9cbdc9ef60.txt`), verbatim: its "Example 5: Using
cURL" block and the status commands of its troubleshooting section.

tests/service/test_seed_examples.py runs them against the service; tests/parity/test_seeds.py checks that they
are still the seed's text."""

SEED_CURL_BLOCK = """\
# Basic usage with default settings
curl -X POST "http://<server-ip>:50000/synthesize" \\
  -F "text=欢迎光临!请问您需要什么?" \\
  --output output.wav

# With custom instruction
curl -X POST "http://<server-ip>:50000/synthesize" \\
  -F "text=今天天气真好" \\
  -F "instruction=你是一位活泼开朗的主持人,声音充满活力。<|endofprompt|>" \\
  --output output.wav

# With custom voice prompt
curl -X POST "http://<server-ip>:50000/synthesize" \\
  -F "text=您好,有什么可以帮您?" \\
  -F "instruction=你是一位专业的客服人员。<|endofprompt|>" \\
  -F "prompt_wav=@./my_voice.wav" \\
  --output output.wav

# Audio-only mode (voice cloning, no instruction)
curl -X POST "http://<server-ip>:50000/synthesize" \\
  -F "text=原神,启动!" \\
  -F "prompt_wav=@./asset/paimon_prompt.wav" \\
  --output output.wav
"""
# From the seed's troubleshooting section.
SEED_STATUS_COMMANDS = ["curl http://localhost:50000/health", "curl http://localhost:50000/model_info"]


def seed_curl_commands() -> list[tuple[str, str]]:
    """(comment, command) for each example in the block."""
    examples = []
    for paragraph in SEED_CURL_BLOCK.strip().split("\n\n"):
        comment, command = paragraph.split("\n", 1)
        examples.append((comment.lstrip("# "), command))
    return examples
