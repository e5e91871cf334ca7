"""Host-side workload definitions: parameters, layouts, selfcheck verifier, compute reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pymig.guest.base import GuestConfig, GuestState
from pymig.guest.layout import (
    GUEST_PAGE_SIZE,
    MAILBOX_GPA,
    MAX_VCPUS,
    PARAMS_GPA,
    WORKSET_GPA,
    RamLayout,
    locate,
)
from pymig.guest.workloads import (
    COMPUTE_SEED,
    GOLDEN,
    MailboxRecord,
    PhysMemory,
    compute_rounds,
    compute_share,
    dirtier_pages,
    expected_compute_result,
    expected_compute_results,
    fill_chunks,
    fill_content,
    make_workload,
    pack_mailbox,
    pack_params,
    pacing,
    parse_params,
    progress_from_mailbox,
    resolve,
    share_bounds,
    unpack_mailbox,
    unpack_params,
    verify_selfcheck,
    xorshift64_sequence,
)

MiB = 1 << 20
U64 = (1 << 64) - 1


# --- parameters ----------------------------------------------------------------------------

def test_defaults_are_the_documented_ones():
    d = parse_params("dirtier")
    assert (d.area_bytes, d.rate_pages_per_s, d.pattern, d.hot_fraction, d.hot_share) == \
        (64 * MiB, 0, "uniform", 0.1, 0.9)
    s = parse_params("selfcheck", {})
    assert (s.area_bytes, s.rate_pages_per_s) == (64 * MiB, 0)
    c = parse_params("compute")
    assert (c.rounds, c.area_bytes, c.rate_pages_per_s) == (64, 4 * MiB, 0)
    assert parse_params("idle").area_bytes == 0
    assert parse_params("idle").fill_bytes == 0


@pytest.mark.parametrize("workload, params, culprit", [
    ("dirtier", {"working_set_bytes": 4097}, "working_set_bytes"),
    ("dirtier", {"working_set_bytes": 0}, "working_set_bytes"),
    ("dirtier", {"rate_pages_per_s": -1}, "rate_pages_per_s"),
    ("dirtier", {"rate_pages_per_s": 1.5}, "rate_pages_per_s"),
    ("dirtier", {"pattern": "random"}, "pattern"),
    ("dirtier", {"hot_fraction": 0.0}, "hot_fraction"),
    ("dirtier", {"hot_fraction": 1.5}, "hot_fraction"),
    ("dirtier", {"hot_share": -0.1}, "hot_share"),
    ("dirtier", {"hot_share": float("nan")}, "hot_share"),
    ("selfcheck", {"pattern": "uniform"}, "pattern"),
    ("compute", {"rounds": 0}, "rounds"),
    ("compute", {"rounds": True}, "rounds"),
    ("compute", {"region_bytes": 100}, "region_bytes"),
    ("compute", {"rate_pages_per_s": -5}, "rate_pages_per_s"),
    ("idle", {"rounds": 1}, "rounds"),
    ("idle", {"fill_bytes": 100}, "fill_bytes"),
    ("idle", {"fill_bytes": -4096}, "fill_bytes"),
    ("dirtier", {"fill_bytes": 4096}, "fill_bytes"),
    ("spin", {}, "spin"),
])
def test_bad_parameters_name_the_culprit(workload, params, culprit):
    with pytest.raises(ValueError, match=culprit):
        parse_params(workload, params)


def test_resolve_checks_the_memory_map():
    small = GuestConfig("simulated", 4 * MiB, workload="selfcheck",
                        params={"working_set_bytes": 4 * MiB})
    with pytest.raises(ValueError, match="do not fit"):
        resolve(small)
    no_low = GuestConfig("simulated", 8 * MiB, workload="idle",
                         blocks=[RamLayout("ram", 8 * MiB, 1 << 32)])
    with pytest.raises(ValueError, match="not inside one RAM block"):
        resolve(no_low)
    with pytest.raises(ValueError, match="vCPUs"):
        resolve(GuestConfig("simulated", 4 * MiB, vcpus=MAX_VCPUS + 1, workload="idle"))
    with pytest.raises(ValueError, match="fill of"):
        resolve(GuestConfig("simulated", 4 * MiB, workload="idle",
                            params={"fill_bytes": 3 * MiB + GUEST_PAGE_SIZE}))
    with pytest.raises(ValueError, match="a page of its own"):
        resolve(GuestConfig("simulated", 4 * MiB, vcpus=3, workload="compute",
                            params={"region_bytes": 2 * GUEST_PAGE_SIZE}))
    with pytest.raises(ValueError, match="two pages per vCPU"):
        resolve(GuestConfig("simulated", 4 * MiB, vcpus=2, workload="dirtier",
                            params={"working_set_bytes": 3 * GUEST_PAGE_SIZE,
                                    "pattern": "hotspot"}))
    with pytest.raises(ValueError, match="below 4 GiB"):
        make_workload(parse_params("selfcheck", {"working_set_bytes": 4 << 30}), 1)


def test_locate_finds_the_block_and_refuses_ranges_across_blocks():
    layout = [RamLayout("low", 2 * MiB, 0), RamLayout("high", 2 * MiB, 4 * MiB)]
    assert locate(layout, 0x6000, GUEST_PAGE_SIZE) == (0, 0x6000)
    assert locate(layout, 5 * MiB, 8) == (1, MiB)
    with pytest.raises(ValueError):
        locate(layout, 2 * MiB - 8, 16)
    with pytest.raises(ValueError):
        locate(layout, 3 * MiB)


@given(total=st.integers(1, 100_000), vcpus=st.integers(1, MAX_VCPUS))
def test_shares_partition_the_area(total, vcpus):
    bounds = [share_bounds(total, vcpus, i) for i in range(vcpus)]
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1


# --- parameter block and mailbox -----------------------------------------------------------

workloads = st.one_of(
    st.builds(lambda w, r, p, f, s: {"workload": "dirtier", "params": {
        "working_set_bytes": w * GUEST_PAGE_SIZE, "rate_pages_per_s": r, "pattern": p,
        "hot_fraction": f, "hot_share": s}},
        st.integers(64, 4096), st.integers(0, 10**6),
        st.sampled_from(["uniform", "sequential", "hotspot"]),
        st.floats(0.001, 1.0), st.floats(0.0, 1.0)),
    st.builds(lambda w, r: {"workload": "selfcheck", "params": {
        "working_set_bytes": w * GUEST_PAGE_SIZE, "rate_pages_per_s": r}},
        st.integers(64, 4096), st.integers(0, 10**6)),
    st.builds(lambda r, w: {"workload": "compute", "params": {
        "rounds": r, "region_bytes": w * GUEST_PAGE_SIZE}},
        st.integers(1, 2**32 - 1), st.integers(64, 4096)),
    st.just({"workload": "idle", "params": {}}),
)


@given(spec=workloads, vcpus=st.integers(1, MAX_VCPUS), tick_khz=st.integers(1000, 10**7))
def test_parameter_block_round_trips(spec, vcpus, tick_khz):
    workload = make_workload(parse_params(spec["workload"], spec["params"]), vcpus)
    page = pack_params(workload, tick_khz)
    assert len(page) == GUEST_PAGE_SIZE
    back = unpack_params(page)
    assert back.shares == workload.shares
    assert back.vcpus == vcpus and back.workload == workload.name
    assert back.pacing == pacing(workload.params.rate_pages_per_s, vcpus, tick_khz)
    assert back.pack() == page
    for share in workload.shares:
        if workload.params.pattern == "hotspot" and workload.name == "dirtier":
            assert 1 <= share.hot_pages < share.npages
        else:
            assert share.hot_pages == 0


def test_parameter_block_layout_is_the_assemblys():
    """The offsets of asm/_defs.S (P_*, SH_*), which the checked-in binaries read."""
    workload = make_workload(parse_params("dirtier", {"working_set_bytes": 8 * MiB,
                                                      "rate_pages_per_s": 5000,
                                                      "pattern": "hotspot"}), 2)
    page = np.frombuffer(pack_params(workload, 2_000_000), dtype=np.uint8)
    u32 = page[:0x20].view("<u4")
    # 2500 pages/s per vCPU: batches of round(0.25) -> 1 page, every 400 us of a 2 GHz clock
    assert list(u32) == [0x47494D50, 1, 2, 2, 2, int(0.9 * 2**32), 1, 0]
    assert list(page[0x20:0x30].view("<u8")) == [800_000, 200_000_000]
    assert page[0x30:0x34].view("<u4")[0] == 2000
    second = page[0x40 + 64:0x40 + 128]
    assert list(second[:16].view("<u4")) == [WORKSET_GPA + 4 * MiB, 1024, round(1024 * 0.1), 0]
    assert second[16:24].view("<u8")[0] == COMPUTE_SEED ^ 1
    with pytest.raises(ValueError, match="magic"):
        unpack_params(bytes(GUEST_PAGE_SIZE))


@pytest.mark.parametrize("rate, vcpus, expected", [
    (0, 2, (64, 0)),
    (20_000, 2, (1, 100_000)),          # 10k pages/s per vCPU: one page every 100 us
    (1_000_000, 1, (100, 100_000)),     # 100 pages per 100 us
    (3, 1, (1, 333_333_333)),
])
def test_pacing_splits_the_rate_evenly_in_batches_of_about_100us(rate, vcpus, expected):
    p = pacing(rate, vcpus, 1_000_000)  # 1 GHz: ticks are nanoseconds
    assert (p.batch_pages, p.ticks_per_batch) == expected
    assert p.max_lag_ticks == 100_000_000 and p.ticks_per_us == 1000


@given(st.lists(st.tuples(*[st.integers(0, U64)] * 5).map(lambda t: MailboxRecord(*t)),
                min_size=1, max_size=MAX_VCPUS))
def test_mailbox_round_trips(records):
    data = pack_mailbox(records)
    assert len(data) == 64 * len(records)
    assert unpack_mailbox(data, len(records)) == records


def test_progress_aggregates_the_records():
    memory = np.zeros(2 * MiB, dtype=np.uint8)
    records = [MailboxRecord(3, 100, 1, 0xF0, 1), MailboxRecord(2, 50, 0, 0x0F, 0)]
    memory[MAILBOX_GPA:MAILBOX_GPA + 128] = np.frombuffer(pack_mailbox(records), np.uint8)
    config = GuestConfig("simulated", 2 * MiB)
    progress = progress_from_mailbox(PhysMemory([memory], config), 2)
    assert progress == {"passes": 2, "pages_written": 150, "errors": 1, "done": 0,
                        "result": 0xFF}


def test_guest_state_holds_cpus_and_devices():
    state = GuestState(cpus=[1, 2])
    assert state.devices == {} and GuestState.VERSION == 1


# --- dirtier reference ---------------------------------------------------------------------

def _dirtier_scalar(workload, index: int, count: int) -> list[int]:
    """The docstring's dirtier, write by write."""
    share, p = workload.shares[index], workload.params
    m, h, x, pos, pages = share.npages, share.hot_pages, share.dirtier_seed, 0, []

    def below(k):
        nonlocal x
        x = _xorshift64(x)
        return (x * k) >> 64

    for _ in range(count):
        if p.pattern == "sequential":
            j = pos
        elif p.pattern == "uniform":
            j = below(m)
        else:
            x = _xorshift64(x)
            j = below(h) if (x >> 32) < p.hot_share_u32 else h + below(m - h)
        pages.append(j)
        pos = (pos + 1) % m
    return pages


@pytest.mark.parametrize("pattern", ["uniform", "sequential", "hotspot"])
@pytest.mark.parametrize("index", [0, 1])
def test_dirtier_reference_matches_the_scalar_definition(pattern, index):
    workload = make_workload(parse_params("dirtier", {"working_set_bytes": 80 * 4096,
                                                      "pattern": pattern, "hot_share": 0.7}), 2)
    assert dirtier_pages(workload, index, 3000).tolist() == \
        _dirtier_scalar(workload, index, 3000)


# --- compute reference ---------------------------------------------------------------------

def _xorshift64(x: int) -> int:
    x ^= (x << 13) & U64
    x ^= x >> 7
    return x ^ ((x << 17) & U64)


@given(seed=st.integers(1, U64), count=st.integers(0, 700))
def test_vectorised_xorshift64_matches_the_scalar_steps(seed, count):
    expected, x = [], seed
    for _ in range(count):
        x = _xorshift64(x)
        expected.append(x)
    assert xorshift64_sequence(seed, count).tolist() == expected


def _rotl(x: int, k: int) -> int:
    return ((x << k) | (x >> (64 - k))) & U64 if k else x


def _compute_scalar(seed: int, nwords: int, rounds: int) -> tuple[int, list[int]]:
    """The docstring's algorithm, word by word, as the assembly runs it."""
    words, x = [], seed
    for _ in range(nwords):
        x = _xorshift64(x)
        words.append(x)
    c = 0
    for _ in range(rounds):
        s = 0
        for j in range(nwords):
            s ^= _rotl((words[j] + j) & U64, j % 64)
        c = _rotl(c, 1) ^ s
        words = [(w + s) & U64 for w in words]
    return c, words


@pytest.mark.parametrize("npages, rounds", [(1, 1), (1, 3), (2, 2)])
def test_compute_reference_matches_the_scalar_algorithm(npages, rounds):
    c, words = _compute_scalar(COMPUTE_SEED ^ 1, npages * 512, rounds)
    ref_c, ref_words = compute_share(COMPUTE_SEED ^ 1, npages, rounds)
    assert ref_c == c and ref_words.tolist() == words


def test_compute_pinned_results():
    """Pinned so that a change of the definition shows (the guests are held to the reference
    by test_workloads_agree)."""
    assert COMPUTE_SEED == GOLDEN
    assert xorshift64_sequence(COMPUTE_SEED, 1).tolist() == [0xDC1B77AE0BF34DAD]
    c, words = compute_share(COMPUTE_SEED, 1, 1)
    assert (int(words[0]), int(words[1]), c) == (0x92F95CE05457172C, 0x1BCED3EB4AD229F5,
                                                 0xB6DDE5324863C97F)
    assert expected_compute_result({"region_bytes": 4096, "rounds": 2}) == 0xFF2D9EE2C43DFBC4
    assert expected_compute_result({}) == 0xD53CE98FA7C66EFB
    assert expected_compute_result({}, 2) == 0xFE5FC1A002C775DB
    results = expected_compute_results({"region_bytes": 8192, "rounds": 5}, 2)
    assert expected_compute_result({"region_bytes": 8192, "rounds": 5}, 2) == \
        results[0] ^ results[1]


def test_compute_result_notices_pages_in_the_wrong_place():
    """Each page starts at a multiple of 64 words, so a fold of rotl64(w[j], j mod 64) alone
    would not change if two pages swapped; the + j in the fold makes it change."""
    words = xorshift64_sequence(COMPUTE_SEED, 4 * 512)
    swapped = words.reshape(4, 512)[[0, 2, 1, 3]].reshape(-1)
    assert compute_rounds(words, 3)[0] != compute_rounds(swapped, 3)[0]


# --- selfcheck verification on synthetic RAM -----------------------------------------------

def _selfcheck_ram(npages_total: int, vcpus: int, positions: list[tuple[int, int]]):
    """RAM as the selfcheck workload leaves it with vCPU i stamping pass p_i at page k_i."""
    config = GuestConfig("simulated", 2 * MiB + npages_total * GUEST_PAGE_SIZE, vcpus=vcpus,
                         workload="selfcheck",
                         params={"working_set_bytes": npages_total * GUEST_PAGE_SIZE})
    memory = np.zeros(config.memory_bytes, dtype=np.uint8)
    phys = PhysMemory([memory], config)
    records = []
    for share, (p, k) in zip(resolve(config).shares, positions):
        k = min(k, share.npages - 1)
        pages = phys.words(share.first_gpa, share.npages * GUEST_PAGE_SIZE).reshape(-1, 512)
        frames = np.arange(share.first_frame, share.first_frame + share.npages, dtype=np.uint64)
        if p > 1:
            pages[:, 0] = pages[:, -1] = p - 1
            pages[:, 1] = frames
        pages[:k, 0] = pages[:k, -1] = p
        pages[:k, 1] = frames[:k]
        stamped = (p - 1) * share.npages + k
        records.append(MailboxRecord(stamped // share.npages, stamped, 0, 0, 0))
    memory[MAILBOX_GPA:MAILBOX_GPA + 64 * vcpus] = np.frombuffer(pack_mailbox(records), np.uint8)
    return config, memory, phys


positions = st.lists(st.tuples(st.integers(1, 6), st.integers(0, 40)), min_size=1, max_size=4)


@given(npages=st.integers(4, 48), positions=positions)
def test_consistent_selfcheck_ram_passes(npages, positions):
    config, memory, _ = _selfcheck_ram(npages, len(positions), positions)
    report = verify_selfcheck([memory], config, exact=True)
    assert report.ok, report.detail
    assert report.passes == min(p for p, _ in positions) - 1
    assert report.errors == 0 and report.in_progress == 0


def test_verifier_counts_passes_from_ram():
    config, memory, _ = _selfcheck_ram(32, 2, [(4, 5), (3, 0)])
    report = verify_selfcheck([memory], config, exact=True)
    assert report.ok and report.passes == 2


def _page(phys: PhysMemory, config: GuestConfig, vcpu: int, j: int) -> np.ndarray:
    share = resolve(config).shares[vcpu]
    return phys.words(share.first_gpa + j * GUEST_PAGE_SIZE, GUEST_PAGE_SIZE)


@pytest.mark.parametrize("damage, message", [
    (lambda pg: pg.__setitem__(100, 7), "outside the stamp words"),
    (lambda pg: pg.__setitem__(511, 9), "torn"),
    (lambda pg: pg.__setitem__(1, 0xDEAD), "frame word"),
    (lambda pg: (pg.__setitem__(0, 1), pg.__setitem__(511, 1)), "pass 1 where"),
])
def test_verifier_detects_a_damaged_page(damage, message):
    config, memory, phys = _selfcheck_ram(32, 2, [(4, 10), (4, 3)])
    damage(_page(phys, config, 1, 12))
    report = verify_selfcheck([memory], config)
    assert not report.ok
    assert any(message in line and "vCPU 1: page 12" in line for line in report.detail), \
        report.detail


def test_verifier_detects_an_out_of_order_stamp():
    config, memory, phys = _selfcheck_ram(32, 1, [(5, 10)])
    pg = _page(phys, config, 0, 20)
    pg[-1], pg[0] = 5, 5  # page 20 stamped with the new pass before pages 10..19
    report = verify_selfcheck([memory], config)
    assert not report.ok
    assert any("out of order" in line for line in report.detail), report.detail


def test_verifier_detects_a_skipped_page():
    config, memory, phys = _selfcheck_ram(32, 1, [(5, 10)])
    pg = _page(phys, config, 0, 4)
    pg[-1], pg[0] = 4, 4  # page 4 missed pass 5 although pages 5..9 have it
    report = verify_selfcheck([memory], config)
    assert not report.ok and any("out of order" in line for line in report.detail)


def test_verifier_reports_the_guests_own_errors_and_a_stale_mailbox():
    config, memory, _ = _selfcheck_ram(32, 1, [(3, 7)])
    record = MailboxRecord(2, 2 * 32 + 7, 4, 0, 0)
    memory[MAILBOX_GPA:MAILBOX_GPA + 64] = np.frombuffer(pack_mailbox([record]), np.uint8)
    report = verify_selfcheck([memory], config)
    assert not report.ok and report.errors == 4
    stale = MailboxRecord(1, 32 + 7, 0, 0, 0)  # as if the mailbox page had not migrated
    memory[MAILBOX_GPA:MAILBOX_GPA + 64] = np.frombuffer(pack_mailbox([stale]), np.uint8)
    report = verify_selfcheck([memory], config)
    assert not report.ok and any("pages written" in line for line in report.detail)


@pytest.mark.parametrize("p", [1, 3])
@pytest.mark.parametrize("with_frame", [False, True])
def test_half_stamped_page_is_accepted_only_in_stamp_order_and_only_when_not_exact(p, with_frame):
    config, memory, phys = _selfcheck_ram(32, 1, [(p, 7)])
    pg = _page(phys, config, 0, 7)
    pg[511] = p  # stamp order: last word, frame, first word
    if with_frame:
        pg[1] = resolve(config).shares[0].first_frame + 7
    report = verify_selfcheck([memory], config)
    assert report.ok and report.in_progress == 1, report.detail
    assert not verify_selfcheck([memory], config, exact=True).ok
    pg[511], pg[0] = p - 1, p  # the first word stamped before the last: not a stop mid-stamp
    assert not verify_selfcheck([memory], config).ok


def test_counters_may_lag_one_stamp_only_when_not_exact():
    config, memory, _ = _selfcheck_ram(32, 1, [(3, 0)])
    lagging = MailboxRecord(1, 2 * 32 - 1, 0, 0, 0)  # stopped after the stamp, before counting
    memory[MAILBOX_GPA:MAILBOX_GPA + 64] = np.frombuffer(pack_mailbox([lagging]), np.uint8)
    assert verify_selfcheck([memory], config).ok
    assert not verify_selfcheck([memory], config, exact=True).ok


def test_verifier_takes_ram_blocks_and_refuses_other_workloads():
    config, memory, _ = _selfcheck_ram(16, 1, [(2, 3)])
    assert verify_selfcheck([memory.tobytes()], config).ok
    with pytest.raises(ValueError, match="selfcheck"):
        verify_selfcheck([memory], GuestConfig("simulated", config.memory_bytes))
    with pytest.raises(ValueError, match="configuration"):
        PhysMemory([memory])
    assert PARAMS_GPA < MAILBOX_GPA < WORKSET_GPA


def test_fill_chunks_are_one_sequence_whatever_the_chunk_size():
    whole = fill_content(3 * GUEST_PAGE_SIZE)
    pieces = [chunk for _, chunk in fill_chunks(3 * GUEST_PAGE_SIZE, chunk_bytes=1000)]
    assert np.array_equal(np.concatenate(pieces), whole)
    # random: no zero page, no repeated page, nothing an LZ-style coder could shorten
    pages = whole.reshape(3, GUEST_PAGE_SIZE)
    assert all(page.any() for page in pages)
    assert len({page.tobytes() for page in pages}) == 3
    assert len(set(whole.tolist())) > 250
