"""The link model: how long moving bytes between devices takes.

A message of n bytes over a link costs `latency + n / bandwidth` (the alpha-beta model).
Collectives run as rings, as NCCL and MPI run them for large buffers: in an all-reduce of a
B-byte buffer over p devices each device sends (and receives) 2(p-1)/p * B bytes in 2(p-1)
steps (a reduce-scatter, then an all-gather); an all-gather of a B-byte result moves (p-1)/p *
B per device in p-1 steps. A broadcast sends the buffer once to each receiver; a send is one
message. So a collective's modelled time is `steps * latency + bytes_per_device / bandwidth`.

Bandwidths are one direction, per device: NVLink 4 on an H100 900 GB/s (all 18 links), PCIe 5
x16 64 GB/s, 100 Gb Ethernet 12.5 GB/s. Latencies are typical small-message figures (NCCL over
NVLink, over PCIe, RDMA over Ethernet); they are assumptions, and only matter for small
messages such as one decode token's activations.
"""

from dataclasses import dataclass

from tinyinfer.parallel.errors import ParallelConfigError


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes per second, one direction, per device
    latency: float  # seconds per message (per ring step)

    def seconds(self, kind: str, buffer_bytes: int, devices: int) -> float:
        """Modelled time of one collective of `kind` on a buffer of buffer_bytes (for an
        all-gather, the gathered result) over `devices` devices."""
        if devices <= 1:
            return 0.0
        return steps(kind, devices) * self.latency + bytes_per_device(kind, buffer_bytes, devices) / self.bandwidth


LINKS = {
    "nvlink": Link("NVLink 4", 900e9, 2e-6),
    "pcie": Link("PCIe 5 x16", 64e9, 5e-6),
    "ethernet": Link("100 GbE", 12.5e9, 10e-6),
}


def get_link(name: str) -> Link:
    if name not in LINKS:
        raise ParallelConfigError(f"unknown link {name!r}; choose one of {', '.join(LINKS)}")
    return LINKS[name]


def bytes_per_device(kind: str, buffer_bytes: int, devices: int) -> int:
    """Bytes each device sends for one collective (what the ledger records as bytes per rank).

    all_reduce: ring, 2(p-1)/p of the buffer; all_gather: (p-1)/p of the gathered result;
    broadcast, send: the buffer (each receiver gets it once); barrier: nothing."""
    if devices <= 1 or kind == "barrier":
        return 0
    if kind == "all_reduce":
        return 2 * (devices - 1) * buffer_bytes // devices
    if kind == "all_gather":
        return (devices - 1) * buffer_bytes // devices
    if kind in ("broadcast", "send", "gather"):
        return buffer_bytes
    raise ValueError(f"unknown collective {kind!r}")


def steps(kind: str, devices: int) -> int:
    """Messages in a row (each paying the latency) for one collective over p devices."""
    if devices <= 1:
        return 0
    return {"all_reduce": 2 * (devices - 1), "all_gather": devices - 1, "barrier": 2 * (devices - 1)}.get(kind, 1)
