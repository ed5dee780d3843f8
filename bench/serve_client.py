"""The load generator of bench/serve.py, in its own process (stdlib only, starts fast).

    python3 bench/serve_client.py URL CONCURRENCY MAX_TOKENS < prompts.json > results.json

CONCURRENCY threads each send one completion at a time (greedy, the real JSON bodies) until
every prompt is answered; prints {"results": [[text, completion tokens, seconds], ...] in
prompt order, "wall": seconds from the first send to the last reply} (this process's own
start-up, about 0.05 s, is not the server's time).
Running clients in another process keeps them from competing with the server's engine and
event-loop threads for the server's interpreter lock, as real clients do not.
"""

import concurrent.futures
import json
import sys
import time
import urllib.request


def complete(url: str, prompt: str, max_tokens: int) -> list:
    """[text, completion tokens, seconds] of one request."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as r:
        reply = json.loads(r.read())
    seconds = time.perf_counter() - start
    return [reply["choices"][0]["text"], reply["usage"]["completion_tokens"], seconds]


def main() -> None:
    url, concurrency, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    prompts = json.load(sys.stdin)
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        results = list(pool.map(lambda p: complete(url, p, max_tokens), prompts))
        wall = time.perf_counter() - start
    json.dump({"results": results, "wall": wall}, sys.stdout)


if __name__ == "__main__":
    main()
