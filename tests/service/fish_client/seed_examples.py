"""The request examples of seed 001 (`shared/seeds/001_c64fc0332cf8e540.txt`), verbatim, in the seed's order.

tests/service/test_fish_api.py runs each against the service with only the URL changed; tests/parity/test_seeds.py
checks that each is still the seed's text. Left out: the server start command and `tools/api_client.py`
(upstream's own programs).
"""

SEED_URL = "http://127.0.0.1:8080"

# GET /v1/health
HEALTH_CURL = r'''curl http://127.0.0.1:8080/v1/health
'''

# POST /v1/tts, msgpack
TTS_MSGPACK = r'''import requests
import ormsgpack
from fish_speech.utils.schema import ServeTTSRequest, ServeReferenceAudio

data = ServeTTSRequest(
    text="你好，这是测试文本",
    format="wav",
    reference_id="my_voice",  # 使用已保存的参考音频
    streaming=False,
)

response = requests.post(
    "http://127.0.0.1:8080/v1/tts",
    params={"format": "msgpack"},
    data=ormsgpack.packb(data, option=ormsgpack.OPT_SERIALIZE_PYDANTIC),
    headers={
        "authorization": "Bearer YOUR_API_KEY",
        "content-type": "application/msgpack",
    },
)

if response.status_code == 200:
    with open("output.wav", "wb") as f:
        f.write(response.content)
'''

# POST /v1/tts, JSON
TTS_JSON = r'''import requests

data = {
    "text": "你好，这是测试文本",
    "format": "wav",
    "reference_id": "my_voice",
    "streaming": False,
}

response = requests.post(
    "http://127.0.0.1:8080/v1/tts?format=json",
    json=data,
    headers={"authorization": "Bearer YOUR_API_KEY"},
)

if response.status_code == 200:
    with open("output.wav", "wb") as f:
        f.write(response.content)
'''

# POST /v1/tts with inline references (continues the msgpack example's imports)
TTS_REFERENCES = r'''from fish_speech.utils.file import audio_to_bytes, read_ref_text

# 使用本地参考音频文件
data = ServeTTSRequest(
    text="你好，这是测试文本",
    format="wav",
    references=[
        ServeReferenceAudio(
            audio=audio_to_bytes("ref_audio.wav"),
            text=read_ref_text("ref_text.txt")
        )
    ],
)

response = requests.post(
    "http://127.0.0.1:8080/v1/tts",
    params={"format": "msgpack"},
    data=ormsgpack.packb(data, option=ormsgpack.OPT_SERIALIZE_PYDANTIC),
    headers={
        "authorization": "Bearer YOUR_API_KEY",
        "content-type": "application/msgpack",
    },
)
'''

# streaming POST /v1/tts played with PyAudio (continues the msgpack example's imports)
TTS_STREAMING = r'''import wave
import pyaudio

data = ServeTTSRequest(
    text="这是一段较长的文本，适合流式输出...",
    format="wav",
    streaming=True,
)

response = requests.post(
    "http://127.0.0.1:8080/v1/tts",
    params={"format": "msgpack"},
    data=ormsgpack.packb(data, option=ormsgpack.OPT_SERIALIZE_PYDANTIC),
    headers={
        "authorization": "Bearer YOUR_API_KEY",
        "content-type": "application/msgpack",
    },
    stream=True,
)

# 实时播放音频
p = pyaudio.PyAudio()
stream = p.open(
    format=pyaudio.paInt16,
    channels=1,
    rate=44100,
    output=True,
)

for chunk in response.iter_content(chunk_size=1024):
    if chunk:
        stream.write(chunk)

stream.stop_stream()
stream.close()
p.terminate()
'''

# POST /v1/vqgan/encode
VQGAN_ENCODE = r'''import requests
import ormsgpack
from fish_speech.utils.schema import ServeVQGANEncodeRequest
from fish_speech.utils.file import audio_to_bytes

data = ServeVQGANEncodeRequest(
    audios=[audio_to_bytes("audio.wav")]
)

response = requests.post(
    "http://127.0.0.1:8080/v1/vqgan/encode",
    params={"format": "msgpack"},
    data=ormsgpack.packb(data, option=ormsgpack.OPT_SERIALIZE_PYDANTIC),
    headers={
        "authorization": "Bearer YOUR_API_KEY",
        "content-type": "application/msgpack",
    },
)

if response.status_code == 200:
    result = ormsgpack.unpackb(response.content)
    tokens = result["tokens"]  # list[list[list[int]]]
'''

# POST /v1/vqgan/decode (its tokens are a placeholder)
VQGAN_DECODE = r'''import requests
import ormsgpack
from fish_speech.utils.schema import ServeVQGANDecodeRequest

data = ServeVQGANDecodeRequest(
    tokens=[[[1, 2, 3, ...], ...], ...]
)

response = requests.post(
    "http://127.0.0.1:8080/v1/vqgan/decode",
    params={"format": "msgpack"},
    data=ormsgpack.packb(data, option=ormsgpack.OPT_SERIALIZE_PYDANTIC),
    headers={
        "authorization": "Bearer YOUR_API_KEY",
        "content-type": "application/msgpack",
    },
)

if response.status_code == 200:
    result = ormsgpack.unpackb(response.content)
    audios = result["audios"]  # list[bytes] (PCM float16 格式)
'''

# POST /v1/references/add
REFERENCES_ADD = r'''import requests

with open("ref_audio.wav", "rb") as audio_file:
    files = {"audio": audio_file}
    data = {
        "id": "my_voice",
        "text": "这是参考文本"
    }
    
    response = requests.post(
        "http://127.0.0.1:8080/v1/references/add",
        files=files,
        data=data,
        headers={"authorization": "Bearer YOUR_API_KEY"},
    )
    
    print(response.json())
'''

# GET /v1/references/list
REFERENCES_LIST_CURL = r'''curl -H "Authorization: Bearer YOUR_API_KEY" \
     http://127.0.0.1:8080/v1/references/list
'''

# DELETE /v1/references/delete
REFERENCES_DELETE = r'''import requests

response = requests.delete(
    "http://127.0.0.1:8080/v1/references/delete",
    json={"reference_id": "my_voice"},
    headers={"authorization": "Bearer YOUR_API_KEY"},
)

print(response.json())
'''

# POST /v1/references/update
REFERENCES_UPDATE = r'''import requests

response = requests.post(
    "http://127.0.0.1:8080/v1/references/update",
    json={
        "old_reference_id": "old_name",
        "new_reference_id": "new_name"
    },
    headers={"authorization": "Bearer YOUR_API_KEY"},
)

print(response.json())
'''

# POST /generate_audio_enhanced_async
ASYNC_GENERATE = r'''import requests
import ormsgpack
from fish_speech.utils.schema import AsyncGenerateRequest

data = AsyncGenerateRequest(
    step_id="task_001",
    text="这是一段需要异步处理的文本",
    format="mp3",
    reference_id="my_voice",
)

response = requests.post(
    "http://127.0.0.1:8080/generate_audio_enhanced_async",
    params={"format": "msgpack"},
    data=ormsgpack.packb(data, option=ormsgpack.OPT_SERIALIZE_PYDANTIC),
    headers={
        "authorization": "Bearer YOUR_API_KEY",
        "content-type": "application/msgpack",
    },
)

if response.status_code == 200:
    result = ormsgpack.unpackb(response.content)
    print(f"Task created: {result['step_id']}, Status: {result['status']}")
'''

# GET /get_task_status/{step_id}
TASK_STATUS_CURL = r'''curl -H "Authorization: Bearer YOUR_API_KEY" \
     http://127.0.0.1:8080/get_task_status/task_001
'''

# GET /download_result/{step_id}
DOWNLOAD_CURL = r'''curl -H "Authorization: Bearer YOUR_API_KEY" \
     http://127.0.0.1:8080/download_result/task_001 \
     -o output.mp3
'''

# POST /stop_generation
STOP_GENERATION = r'''import requests

response = requests.post(
    "http://127.0.0.1:8080/stop_generation",
    headers={"authorization": "Bearer YOUR_API_KEY"},
)

print(response.json())
'''

# POST /stop_async_task/{step_id}
STOP_ASYNC_TASK = r'''import requests

response = requests.post(
    "http://127.0.0.1:8080/stop_async_task/task_001",
    headers={"authorization": "Bearer YOUR_API_KEY"},
)

print(response.json())
'''

# the cURL section (three commands)
CURL_EXAMPLES = r'''# 健康检查
curl http://127.0.0.1:8080/v1/health

# TTS (需要将请求体序列化为 msgpack 或 json)
curl -X POST http://127.0.0.1:8080/v1/tts?format=json \
     -H "Content-Type: application/json" \
     -H "Authorization: Bearer YOUR_API_KEY" \
     -d '{"text": "测试文本", "format": "wav"}'

# 列出参考音频
curl -H "Authorization: Bearer YOUR_API_KEY" \
     http://127.0.0.1:8080/v1/references/list
'''

# the fetch example (a function; the test calls it)
JAVASCRIPT = r'''// 使用 fetch API
async function generateSpeech(text, referenceId) {
  const response = await fetch('http://127.0.0.1:8080/v1/tts?format=json', {
    method: 'POST',
    headers: {
      'Content-Type': 'application/json',
      'Authorization': 'Bearer YOUR_API_KEY'
    },
    body: JSON.stringify({
      text: text,
      format: 'wav',
      reference_id: referenceId
    })
  });
  
  if (response.ok) {
    const audioBlob = await response.blob();
    const audioUrl = URL.createObjectURL(audioBlob);
    const audio = new Audio(audioUrl);
    audio.play();
  }
}
'''
