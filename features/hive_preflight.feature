# S4.2 Hive preflight (what the queen asks a hive), S4.3 Worker resource preflight,
# S10 (the hive validates the device against what it detected). GPU figures are
# pinned through the hive's resource override file: no GPU is needed to run these.
Feature: A hive says what it has and refuses workers that do not fit
  Before a worker is started, the hive checks the backend, the device, RAM,
  VRAM and (before a download) disk. Each refusal has a stable code, the
  figures behind it and what to do next. A GPU request never falls back to the CPU.

  Scenario: The hive answers health with its version and API version
    Given a running hive
    When I ask the hive for its health
    Then it answers status "healthy", version "0.1.0" and API version "v1"
    And the same call without the API key is refused with MISSING_API_KEY

  Scenario: rbee-hive detect prints the backends in human and registry form
    When I run rbee-hive detect with two pinned GPUs
    Then it prints "✅ cpu: 1 device [0]"
    And it prints 'backends: ["cpu", "cuda"]'
    And it prints 'devices: {"cpu": 1, "cuda": 2}'

  Scenario Outline: Each resource check passes at its figure and fails one byte below it
    Given a running hive whose <resource> figure is pinned to exactly what a 1000 MB model needs
    When I check a 1000 MB model on <backend> device 0
    Then the check passes with <resource> <required> MB needed and <required> MB available
    When the hive's <resource> figure drops by one byte
    And I check a 1000 MB model on <backend> device 0
    Then it is refused with <code>

    Examples:
      | resource | backend | required | code              |
      | ram      | cpu     | 1200     | INSUFFICIENT_RAM  |
      | vram     | cuda    | 1200     | VRAM_EXHAUSTED    |
      | disk     | cpu     | 1000     | INSUFFICIENT_DISK |

  Scenario: Not enough disk for a download says how much to free
    Given a running hive with 750 MB of free disk
    When I check a 1000 MB model on cpu device 0
    Then it is refused with INSUFFICIENT_DISK
    And the refusal says to free 250 MB and suggests "rbee-keeper models rm"

  Scenario: CUDA on a node without CUDA is refused, never replaced by the CPU
    Given a running hive without GPUs
    When I check a 1000 MB model on cuda device 0
    Then it is refused with BACKEND_UNAVAILABLE
    And the refusal says CUDA is not available and lists "cpu" as available

  Scenario: A device that does not exist
    Given a running hive with two pinned GPUs
    When I check a 1000 MB model on cuda device 5
    Then it is refused with DEVICE_NOT_AVAILABLE
    And the message is "Device 5 not available. Available: [0, 1]"

  Scenario: A spawn that does not fit starts no process
    Given a running hive with 5 MB of available RAM
    When I spawn a worker for a 10 MB model on cpu device 0
    Then the spawn is refused with INSUFFICIENT_RAM, 12 MB required
    And the hive has no child process and no worker

  Scenario: The worker program is missing
    Given a running hive whose worker program is not installed
    When I spawn a worker for a 10 MB model on cpu device 0
    Then the spawn is refused with WORKER_BINARY_NOT_FOUND naming the expected path
    And the refusal suggests installing the worker
