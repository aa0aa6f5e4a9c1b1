import pytest

from upcycle.errors import UserError
from upcycle.training.executors import run_jobs


def square_job(x: int, progress=None) -> int:
    return x * x


def test_local_and_process_executors_return_results_in_job_order():
    jobs = [(i,) for i in range(5)]
    assert run_jobs(square_job, jobs, executor="local") == [0, 1, 4, 9, 16]
    assert run_jobs(square_job, jobs, executor="process", workers=2) == [0, 1, 4, 9, 16]


def test_ray_executor_runs_jobs_on_a_local_ray():
    pytest.importorskip("ray")
    import ray

    try:
        assert run_jobs(square_job, [(i,) for i in range(4)], executor="ray") == [0, 1, 4, 9]
    finally:
        ray.shutdown()


def test_unknown_executor_is_a_user_error():
    with pytest.raises(UserError, match="choose one of"):
        run_jobs(square_job, [(1,)], executor="slurm")
