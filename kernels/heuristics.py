"""Block sizes and work split for the global-max-pool kernels.

Plain Python, importable without Triton, so the choices can be tested and printed anywhere.

The kernels are memory bound: the goal is coalesced, vectorised loads and enough programs in
flight to cover the whole GPU, at both ends of the shape range:

* many samples with small maps (N=256, C=2048, 7x7): one split, parallel over samples and
  channel blocks;
* few samples with large maps (N=1..8, C=256, 128x128): too few (sample, channel block) pairs to
  fill the GPU, so the positions are cut into splits that run in parallel and are combined after.
"""

from dataclasses import dataclass

# Elements in one tile of the pooling and scatter kernels: with 4 warps that is 16 elements a
# thread (four 16-byte loads in fp32), enough in flight per thread without spilling.
TILE_ELEMENTS = 2048
# Longest run of contiguous positions a tile reads in NCHW: 2 KiB in fp32.
MAX_BLOCK_S = 512
# Widest run of contiguous channels a tile reads in channels_last: 512 bytes in fp32, four
# 128-byte lines per position.
MAX_BLOCK_C_CHANNELS_LAST = 128
# Programs to launch per multiprocessor before splitting stops paying: several resident programs
# per SM hide memory latency.
PROGRAMS_PER_SM = 8
# 32-bit registers a thread may spend on the live state of its tile elements (running
# statistics, the loaded value, 64-bit offsets), leaving room for addresses and temporaries:
# 16 elements of fp32 max (value, index, load), 8 of anything heavier. Found with the GPU-code
# gate (Triton 3.9, ptxas 13): fp64 and int64-offset tiles spilled at 16 elements a thread, and
# some spilled at 4 (with fewer registers in use) but none at 8. Tiles of 8 warps spilled a few
# bytes where the same elements a thread over 4 warps did not, so 4 warps is the most.
LANE_WORD_BUDGET = 64
MAX_ELEMENTS_PER_THREAD = 16
MAX_WARPS = 4
# Row kernels (norm, combine) read at most this many channels at once.
MAX_ROW_BLOCK = 1024
# CUDA allows 2**31 - 1 blocks along the first grid dimension.
MAX_GRID = 2**31 - 1


def next_power_of_2(value: int) -> int:
    return 1 << max(0, int(value) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class TileConfig:
    """How a (N, C, S) map is cut into programs for the pooling and scatter kernels."""

    block_c: int
    block_s: int
    num_c_blocks: int
    num_splits: int
    positions_per_split: int
    num_warps: int

    def grid_size(self, n: int) -> int:
        return n * self.num_c_blocks * self.num_splits


def tile_config(
    n: int,
    c: int,
    s: int,
    channels_contiguous: bool,
    num_sms: int,
    splits: int | None = None,
    block_s: int | None = None,
    lane_words: int = 3,
) -> TileConfig:
    """Choose the tile and split for a map of ``n`` samples, ``c`` channels and ``s`` positions.

    ``channels_contiguous`` is true for channels_last (and (N, L, C)-style) layouts, where a tile
    must run along the channels to be coalesced; otherwise it runs along the positions.
    ``splits`` and ``block_s`` (a power of two) override the choice, so that tests can force
    several splits on small maps; the split count is still capped so that no split is empty.
    ``lane_words`` is how many 32-bit registers each tile element keeps alive through the loop
    (running statistics, the loaded value, 64-bit offsets); it sets how many elements a thread
    may hold, hence the tile size and the number of warps.
    """
    per_thread = _elements_per_thread(lane_words)
    tile_elements = min(TILE_ELEMENTS, per_thread * 32 * MAX_WARPS)
    if block_s is not None:
        block_c = min(next_power_of_2(c), max(1, tile_elements // block_s))
    elif channels_contiguous:
        block_c = min(next_power_of_2(c), MAX_BLOCK_C_CHANNELS_LAST)
        block_s = min(next_power_of_2(s), max(1, tile_elements // block_c))
    else:
        block_s = min(next_power_of_2(s), MAX_BLOCK_S)
        block_c = min(next_power_of_2(c), max(1, tile_elements // block_s))
    num_c_blocks = cdiv(c, block_c)

    programs = n * num_c_blocks
    target = PROGRAMS_PER_SM * num_sms
    num_splits = 1
    if programs < target:
        num_splits = min(cdiv(target, max(programs, 1)), cdiv(s, block_s))
    if splits is not None:
        num_splits = max(1, min(splits, cdiv(s, block_s)))
    # Whole tiles per split, so only the last tile of a split is partial; recount the splits so
    # that none is empty.
    positions_per_split = cdiv(cdiv(s, num_splits), block_s) * block_s
    num_splits = cdiv(s, positions_per_split)

    num_warps = min(MAX_WARPS, max(1, block_c * block_s // (32 * per_thread)))
    return TileConfig(block_c, block_s, num_c_blocks, num_splits, positions_per_split, num_warps)


def _elements_per_thread(lane_words: int) -> int:
    fitting = max(1, LANE_WORD_BUDGET // max(1, lane_words))
    return min(MAX_ELEMENTS_PER_THREAD, 1 << (fitting.bit_length() - 1))


def row_config(c: int, element_words: int = 1) -> tuple[int, int]:
    """Block and warps of the per-sample and per-channel-block kernels (combine, finish, norm),
    for elements of ``element_words`` 32-bit words (2 for fp64): 8 words a thread at most."""
    block = min(next_power_of_2(c), MAX_ROW_BLOCK // element_words)
    num_warps = 4 if block * element_words >= 512 else 2 if block * element_words >= 128 else 1
    return block, num_warps
