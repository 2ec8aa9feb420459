"""``hostpool._loops.current_loop``: which event loop runs, decided as sniffio decides."""

from __future__ import annotations

import asyncio

import pytest
import sniffio

from hostpool._loops import current_loop

pytestmark = pytest.mark.anyio


async def test_the_running_loop_is_named_as_the_backend_knows_it(anyio_backend_name: str) -> None:
    loop = current_loop()
    if anyio_backend_name == "trio":
        import trio

        assert loop is trio.lowlevel.current_trio_token()
    else:
        assert loop is asyncio.get_running_loop()
    assert current_loop() is loop


def test_outside_any_loop_sniffio_says_so() -> None:
    with pytest.raises(sniffio.AsyncLibraryNotFoundError):
        current_loop()


def test_a_loop_callback_outside_any_task_is_left_to_sniffio() -> None:
    # sniffio calls asyncio "running" only inside a task; so does current_loop.
    async def main() -> BaseException | None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[BaseException | None] = loop.create_future()

        def callback() -> None:
            try:
                current_loop()
            except BaseException as exc:
                done.set_result(exc)
            else:  # pragma: no cover - the failure this test looks for
                done.set_result(None)

        loop.call_soon(callback)
        return await done

    assert isinstance(asyncio.run(main()), sniffio.AsyncLibraryNotFoundError)


async def test_a_library_that_declares_itself_to_sniffio_is_believed_as_sniffio_does(
    anyio_backend_name: str,
) -> None:
    # What trio-asyncio does in its modes: the context variable wins over a
    # running asyncio loop; trio's thread-local declaration wins over both.
    token = sniffio.current_async_library_cvar.set("curio")
    try:
        said = sniffio.current_async_library()
        assert said == ("trio" if anyio_backend_name == "trio" else "curio")
        if said == "curio":
            assert current_loop() == "curio"
        else:
            import trio

            assert current_loop() is trio.lowlevel.current_trio_token()
    finally:
        sniffio.current_async_library_cvar.reset(token)
