"""The environment a worker starts with: an allow-list, never a secret."""

from __future__ import annotations

from rbee_hive.workers.environment import is_secret, worker_environment, without_secrets


def test_allowed_names_and_prefixes_pass_secrets_and_the_rest_do_not():
    hive = {
        "PATH": "/usr/bin", "HOME": "/home/h", "LANG": "C.UTF-8", "LC_CTYPE": "C.UTF-8", "TMPDIR": "/tmp",
        "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2", "CUDA_VISIBLE_DEVICES": "0", "NVIDIA_VISIBLE_DEVICES": "all",
        "HF_HOME": "/hf", "HF_HUB_OFFLINE": "1", "PYTHONPATH": "/p", "OPENBLAS_NUM_THREADS": "1",
        "RBEE_HIVE_API_KEY": "hive-key", "RBEE_HIVE_PORT": "7900", "HF_TOKEN": "hf_x", "VLLM_API_KEY": "k",
        "AWS_SECRET_ACCESS_KEY": "s", "SSH_AUTH_SOCK": "/run/agent", "RANDOM_THING": "r", "CUSTOM_OPT": "c",
    }  # fmt: skip
    env = worker_environment(hive, {"RBEE_WORKER_API_KEY": "w", "RBEE_CALLBACK_API_KEY": "c"}, ["CUSTOM_*", "HF_TOKEN"])
    assert sorted(env) == sorted([
        "PATH", "HOME", "LANG", "LC_CTYPE", "TMPDIR", "VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
        "NVIDIA_VISIBLE_DEVICES", "HF_HOME", "HF_HUB_OFFLINE", "PYTHONPATH", "OPENBLAS_NUM_THREADS", "CUSTOM_OPT",
        "RBEE_WORKER_API_KEY", "RBEE_CALLBACK_API_KEY",
    ])  # fmt: skip
    assert "HF_TOKEN" not in env, "an operator's extra pattern cannot let a secret through"


def test_secrets_are_recognised_by_whole_words():
    for name in ("HF_TOKEN", "RBEE_HIVE_API_KEY", "RBEE_HIVE_API_KEY_FILE", "DB_PASSWORD", "GH_TOKEN", "AWS_SECRET_ACCESS_KEY"):
        assert is_secret(name), name
    for name in ("TOKENIZERS_PARALLELISM", "KEYBOARD", "PATH", "VLLM_CPU_KVCACHE_SPACE", "MONKEY_BUSINESS"):
        assert not is_secret(name), name
    assert without_secrets({"HF_TOKEN": "x", "HTTPS_PROXY": "p"}) == {"HTTPS_PROXY": "p"}


def test_worker_sleep_mode_starts_cuda_workers_with_sleep_mode_only(monkeypatch, tmp_path):
    from pathlib import Path

    from rbee_hive.settings import load_settings
    from rbee_hive.workers.events import EventLog
    from rbee_hive.workers.preparation import LaunchPreparation
    from rbee_hive.workers.registry import WorkerRecord

    (tmp_path / "empty.toml").write_text("")
    monkeypatch.setenv("RBEE_CONFIG", str(tmp_path / "empty.toml"))
    monkeypatch.delenv("RBEE_WORKER_SLEEP_MODE", raising=False)

    def env_of(backend: str) -> dict[str, str]:
        record = WorkerRecord("w-1", "127.0.0.1", 9000, "hf:o/m", "/m", backend, 0, "k", "c", Path("/l"), EventLog())
        return LaunchPreparation(load_settings(home=tmp_path), lambda: "127.0.0.1:1").environment(record)

    assert load_settings(home=tmp_path).worker_sleep_mode is False
    assert "RBEE_WORKER_SLEEP_MODE" not in env_of("cuda")
    monkeypatch.setenv("RBEE_HIVE_WORKER_SLEEP_MODE", "1")
    assert env_of("cuda")["RBEE_WORKER_SLEEP_MODE"] == "1"
    assert "RBEE_WORKER_SLEEP_MODE" not in env_of("cpu"), "vLLM has sleep mode on CUDA only"
