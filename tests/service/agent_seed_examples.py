"""The request examples of seed 000 (`shared/seeds/000_65ade4a8bd6b83c7.txt`, the voice agent API), verbatim:
its Python, JavaScript/Node.js and cURL blocks. tests/service/test_agent_seed_examples.py runs them against the
service with only the endpoint URL changed; tests/parity/test_seeds.py checks that they are still the seed's text."""

SEED_ENDPOINT = "https://api.runpod.ai/v2/{YOUR_ENDPOINT_ID}/run"

SEED_PYTHON = """\
import requests
import json
import base64
import numpy as np
import soundfile as sf
import io

# API endpoint URL
ENDPOINT = "https://api.runpod.ai/v2/{YOUR_ENDPOINT_ID}/run"

def chat_with_fish_speech(message, system_message=None, system_audio=None, conversation_id=None, streaming=False):
    headers = {
        "Content-Type": "application/json",
        "Authorization": "Bearer {YOUR_API_KEY}"
    }
    
    payload = {
        "input": {
            "message": message,
            "streaming": streaming,
            "format": "wav",
            "temperature": 0.7,
            "max_new_tokens": 512
        }
    }
    
    # Add optional parameters if provided
    if system_message:
        payload["input"]["system_message"] = system_message
    if system_audio:
        with open(system_audio, "rb") as f:
            audio_bytes = f.read()
            payload["input"]["system_audio"] = base64.b64encode(audio_bytes).decode('utf-8')
    if conversation_id:
        payload["input"]["conversation_id"] = conversation_id
        
    if streaming:
        # Handle streaming response
        response = requests.post(ENDPOINT, headers=headers, json=payload, stream=True)
        for chunk in response.iter_lines():
            if chunk:
                data = json.loads(chunk.decode('utf-8').replace('data: ', ''))
                if data['type'] == 'text':
                    print(data['content'], end='', flush=True)
                elif data['type'] == 'audio':
                    # Process audio chunk
                    audio_bytes = base64.b64decode(data['content'])
                    # Play audio or save as needed
    else:
        # Handle regular response
        response = requests.post(ENDPOINT, headers=headers, json=payload)
        result = response.json()
        
        if result.get("status") == "success":
            output = result["output"]
            
            # If audio is present, decode and save it
            if "audio_base64" in output:
                audio_bytes = base64.b64decode(output["audio_base64"])
                audio_data = np.frombuffer(audio_bytes, dtype=np.int16)
                sf.write("response.wav", audio_data, output["sample_rate"])
                
            return output
        else:
            raise Exception(f"API Error: {result.get('error', 'Unknown error')}")

# Example usage
response = chat_with_fish_speech(
    message="Tell me a short story about a robot",
    system_message="You are a creative storyteller with a warm, friendly voice",
    system_audio="reference_voice.wav"  # Optional: for voice cloning
)

print(response["text"])
"""

SEED_JAVASCRIPT = """\
const axios = require('axios');
const fs = require('fs');

const ENDPOINT = 'https://api.runpod.ai/v2/{YOUR_ENDPOINT_ID}/run';
const API_KEY = '{YOUR_API_KEY}';

async function chatWithFishSpeech(message, options = {}) {
    const { systemMessage, systemAudio, conversationId, streaming = false } = options;
    
    const payload = {
        input: {
            message: message,
            streaming: streaming,
            format: "wav",
            temperature: 0.7,
            max_new_tokens: 512
        }
    };
    
    if (systemMessage) payload.input.system_message = systemMessage;
    if (conversationId) payload.input.conversation_id = conversationId;
    
    // Add system audio if provided
    if (systemAudio) {
        const audioData = fs.readFileSync(systemAudio);
        payload.input.system_audio = audioData.toString('base64');
    }
    
    try {
        if (streaming) {
            const response = await axios.post(ENDPOINT, payload, {
                headers: {
                    'Content-Type': 'application/json',
                    'Authorization': `Bearer ${API_KEY}`
                },
                responseType: 'stream'
            });
            
            response.data.on('data', (chunk) => {
                const data = JSON.parse(chunk.toString().replace('data: ', ''));
                if (data.type === 'text') {
                    process.stdout.write(data.content);
                } else if (data.type === 'audio') {
                    // Process audio chunk
                    const audioBuffer = Buffer.from(data.content, 'base64');
                    // Play audio or save as needed
                }
            });
            
            return new Promise((resolve) => {
                response.data.on('end', () => {
                    resolve();
                });
            });
        } else {
            const response = await axios.post(ENDPOINT, payload, {
                headers: {
                    'Content-Type': 'application/json',
                    'Authorization': `Bearer ${API_KEY}`
                }
            });
            
            if (response.data.status === 'success') {
                const output = response.data.output;
                
                // If audio is present, save it to a file
                if (output.audio_base64) {
                    const audioBuffer = Buffer.from(output.audio_base64, 'base64');
                    fs.writeFileSync('response.wav', audioBuffer);
                    console.log('Audio saved to response.wav');
                }
                
                return output;
            } else {
                throw new Error(`API Error: ${response.data.error || 'Unknown error'}`);
            }
        }
    } catch (error) {
        console.error('Request failed:', error);
        throw error;
    }
}

// Example usage
async function main() {
    try {
        const response = await chatWithFishSpeech(
            'What is the weather like today?',
            {
                systemMessage: 'You are a helpful weather assistant',
                systemAudio: 'reference_voice.wav',  // Optional: for voice cloning
                streaming: false
            }
        );
        
        console.log(response.text);
    } catch (error) {
        console.error('Error:', error.message);
    }
}

main();
"""

SEED_CURL_BLOCK = """\
# For a basic request without streaming
curl -X POST "https://api.runpod.ai/v2/{YOUR_ENDPOINT_ID}/run" \\
     -H "Content-Type: application/json" \\
     -H "Authorization: Bearer {YOUR_API_KEY}" \\
     -d '{
         "input": {
             "message": "Tell me a joke",
             "system_message": "You are a funny assistant",
             "conversation_id": "joke-session",
             "streaming": false,
             "format": "wav",
             "temperature": 0.7
         }
     }'

# For streaming response (requires a client that can handle streamed responses)
curl -X POST "https://api.runpod.ai/v2/{YOUR_ENDPOINT_ID}/run" \\
     -H "Content-Type: application/json" \\
     -H "Authorization: Bearer {YOUR_API_KEY}" \\
     -d '{
         "input": {
             "message": "Tell me a joke",
             "system_message": "You are a funny assistant",
             "streaming": true,
             "format": "wav"
         }
     }'
"""
