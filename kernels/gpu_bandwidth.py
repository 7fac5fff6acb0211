"""A GPU memory-bandwidth probe: copy a large buffer to another on the device, timed by CUDA events.

Decode on a GPU reads every weight from the GPU's own memory (HBM) once per token, so its
speed limit is that memory's bandwidth, not the CPU's (kernels/bandwidth.py). We measure it
with a device-to-device copy of two buffers of 1 GiB (less when free memory is short): a copy
reads each byte once and writes it once, so the bandwidth is 2 x bytes / seconds. Each copy is
timed with CUDA events (on the GPU's clock, not the host's, which would add the launch), best
of 10 after a warm-up. Two ways of copying are timed, the copy engine's memcpy and a CuPy copy
kernel over 16-byte elements; the faster is the figure.

For scale: an H200's HBM3e is 4.8 TB/s on paper, and a copy typically reaches a large
fraction of that (some of the traffic is lost to turning the bus around between reads and
writes). A decode that reads weights at the copy's rate is as fast as this GPU goes.

CuPy is never imported here: the caller passes the `cupy` module (`cp`), so this file imports
on any machine.
"""

from dataclasses import dataclass

GIB = 2**30
MIN_BYTES = 16 * 2**20  # below this the copy is too short for events to time it well


@dataclass(frozen=True)
class DeviceMemory:
    """What bench needs of a GPU for decode's bound: the copy bandwidth and the L2 cache."""

    name: str  # e.g. "NVIDIA H200"
    bandwidth: float  # bytes/s, by copy_bandwidth
    l2_bytes: int  # the last-level cache on the GPU; 0 where the device does not say
    memory_bytes: int  # all of the device's memory


def device_properties(cp) -> dict:
    """The current device's name, L2 size and memory size, from cudaGetDeviceProperties."""
    device = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(device.id)
    name = props.get("name", b"GPU")
    name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
    l2 = props.get("l2CacheSize") or device.attributes.get("L2CacheSize", 0)
    return {"name": name.strip("\x00 ").strip(), "l2_bytes": int(l2 or 0),
            "memory_bytes": int(props.get("totalGlobalMem", 0))}


def probe_bytes(free_bytes: int, wanted: int = GIB) -> int:
    """How large each of the two buffers is: `wanted`, or a quarter of the free memory when
    that is less (the two buffers then take half of it); a multiple of 16 bytes."""
    return max(MIN_BYTES, min(wanted, free_bytes // 4)) // 16 * 16


def time_copy(cp, copy, repeats: int) -> float:
    """Seconds of the fastest of `repeats` runs of copy(), after one warm-up, by CUDA events
    recorded on the current stream around each."""
    copy()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    best = float("inf")
    for _ in range(repeats):
        start.record()
        copy()
        end.record()
        end.synchronize()
        best = min(best, cp.cuda.get_elapsed_time(start, end) / 1e3)  # milliseconds -> seconds
    return best


def copy_bandwidth(cp, nbytes: int = GIB, repeats: int = 10) -> float:
    """Bytes per second that a device-to-device copy moves: 2 x bytes / seconds (each byte is
    read once and written once), the best of the copy engine's memcpy and a copy kernel."""
    free, _ = cp.cuda.Device().mem_info
    nbytes = probe_bytes(free, nbytes)
    src = cp.ones(nbytes // 16, dtype=cp.complex128)  # 16-byte elements: each thread moves 16 bytes
    dst = cp.empty_like(src)
    try:
        memcpy = time_copy(cp, lambda: dst.data.copy_from_device_async(src.data, nbytes), repeats)
        kernel = time_copy(cp, lambda: cp.copyto(dst, src), repeats)
    finally:
        del src, dst
        cp.get_default_memory_pool().free_all_blocks()  # give the 2 GiB back for the model
    return 2 * nbytes / min(memcpy, kernel)


def device_memory(cp, nbytes: int = GIB, repeats: int = 10) -> DeviceMemory:
    """The current GPU's name, copy bandwidth, L2 and memory sizes (measured now: cache it)."""
    props = device_properties(cp)
    return DeviceMemory(props["name"], copy_bandwidth(cp, nbytes, repeats), props["l2_bytes"], props["memory_bytes"])
