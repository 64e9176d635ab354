"""Fair share through the Hub: the handler names each request's user, and a user's single request is not stuck
behind another user's queue. On the in-process instance, whose engine the test can watch; the assertions are
about the order in which streams get their first text, never about time."""

from __future__ import annotations

import asyncio

import openai
import requests
from conftest import wait_for

MODEL = "tiny-generate"  # one slot, sixteen waiting places
QUEUED = 16


def api_key(hub, instance, prefix: str) -> str:
    user = hub.new_user(prefix)
    token = hub.api.user_token(user)
    r = requests.post(
        instance.url + "api/keys",
        headers={"Authorization": f"Bearer {token}"},
        json={"name": "k"},
        timeout=30,
    )
    return r.json()["key"]


def test_one_users_request_is_not_stuck_behind_anothers_queue(hub):
    instance = hub.instances["postgresql"]
    models = instance.app.services.models
    flooder, other = api_key(hub, instance, "flood"), api_key(hub, instance, "one")
    first_text: list[str] = []

    async def stream(client, who: str, max_tokens: int) -> None:
        chunks = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"A question from {who}."}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
        )
        seen = False
        async for chunk in chunks:
            if not seen and chunk.choices and chunk.choices[0].delta.content:
                seen = True
                first_text.append(who)

    async def run() -> None:
        kw = {"base_url": instance.url + "v1", "max_retries": 0, "timeout": 300}
        async with (
            openai.AsyncOpenAI(api_key=flooder, **kw) as a,
            openai.AsyncOpenAI(api_key=other, **kw) as b,
        ):
            flood = [asyncio.create_task(stream(a, "flood", 200)) for _ in range(QUEUED)]
            loop = asyncio.get_running_loop()
            # All sixteen are in the service (one decoding, the rest waiting) before the other user asks.
            await loop.run_in_executor(None, lambda: wait_for(lambda: models.in_flight(MODEL) == QUEUED))
            await stream(b, "one", 8)
            for task in flood:  # the flooder goes away: its waiting requests leave the queue
                task.cancel()
            await asyncio.gather(*flood, return_exceptions=True)

    asyncio.run(run())
    # The one request waits for the slot that frees next, not for the sixteen: one flood stream at most
    # (the one decoding when it arrived) starts before it.
    assert first_text.index("one") <= 1, first_text
    wait_for(lambda: models.in_flight(MODEL) == 0, what="the flooder's requests to leave")
