"""Slots: what jobs may share one instance, and which GPUs each one gets."""

from __future__ import annotations

import random
import threading

import pytest

from snakemake_executor_plugin_vastai.market.shares import Capacity, Needs
from snakemake_executor_plugin_vastai.pool.slots import SlotBook

MACHINE = Capacity(gpus=4, cores=16.0, mem_gb=64.0, disk_gb=100.0)


def test_each_gpu_goes_to_one_job_at_a_time() -> None:
    book = SlotBook(MACHINE)
    leases = [book.take(Needs(gpus=1)) for _ in range(4)]
    assert sorted(lease.gpu_ids for lease in leases) == [(0,), (1,), (2,), (3,)]
    assert not book.fits(Needs(gpus=1))
    assert book.fits(Needs(gpus=0))  # a CPU job still fits beside them
    book.give_back(leases[2])
    assert book.take(Needs(gpus=1)).gpu_ids == (2,)


def test_environment_confines_the_job_to_its_gpus() -> None:
    book = SlotBook(MACHINE)
    book.take(Needs(gpus=1))
    two = book.take(Needs(gpus=2))
    assert two.environment() == {"CUDA_VISIBLE_DEVICES": "1,2", "NVIDIA_VISIBLE_DEVICES": "1,2"}
    cpu = book.take(Needs(gpus=0))
    assert cpu.environment() == {"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": "void"}


@pytest.mark.parametrize(
    ("first", "second", "fits"),
    [
        (Needs(cores=10), Needs(cores=6), True),
        (Needs(cores=10), Needs(cores=7), False),
        (Needs(mem_gb=40), Needs(mem_gb=30), False),
        (Needs(disk_gb=60), Needs(disk_gb=40), True),
        (Needs(disk_gb=60), Needs(disk_gb=41), False),
    ],
)
def test_cores_memory_and_disk_add_up(first: Needs, second: Needs, fits: bool) -> None:
    book = SlotBook(MACHINE)
    book.take(first)
    assert book.fits(second) == fits
    assert book.capacity.holds(second)


def test_no_packing_means_one_job_holding_everything() -> None:
    book = SlotBook(MACHINE, exclusive=True)
    whole = book.take(Needs(gpus=1, cores=1))
    assert whole.gpu_ids is None and whole.environment() == {}
    assert not book.fits(Needs(gpus=0, cores=1))
    book.give_back(whole)
    assert book.fits(Needs(gpus=4, cores=16))
    assert not book.fits(Needs(gpus=5))


def test_many_threads_never_overfill_an_instance() -> None:
    """Jobs of random sizes taking and giving back slots from many threads at once, under
    one lock as the instance table holds it: the sums never pass the machine."""
    book = SlotBook(MACHINE)
    lock = threading.Lock()
    broken: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        held = []
        for _ in range(300):
            with lock:
                needs = Needs(gpus=rng.randint(0, 2), cores=rng.choice([1, 2, 4]), mem_gb=8)
                if rng.random() < 0.6 and book.fits(needs):
                    held.append(book.take(needs))
                elif held:
                    book.give_back(held.pop(rng.randrange(len(held))))
                gpus = [g for lease in book.leases for g in lease.gpu_ids or ()]
                if len(gpus) != len(set(gpus)) or len(gpus) > MACHINE.gpus:
                    broken.append(f"GPUs {gpus}")
                if sum(lease.needs.cores for lease in book.leases) > MACHINE.cores:
                    broken.append("cores")
                if sum(lease.needs.mem_gb for lease in book.leases) > MACHINE.mem_gb:
                    broken.append("memory")

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert broken == []
