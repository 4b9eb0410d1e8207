# S6.1 Hive worker registry, S7 Worker lifecycle (hive side).
Feature: The hive spawns workers and keeps a registry of them
  A worker is spawned for a model, backend and device after the preflight;
  its server comes up, it calls the hive back and is registered as loading;
  whoever spawned it follows its narration and loading progress until it is idle.

  @engine
  Scenario: A worker on the default model goes from loading to idle and streams tokens
    Given a running hive with the real worker program
    When I spawn a worker for the default model on cpu device 0
    Then the spawn answers at once with the worker in state loading
    And following it shows the worker's own narration and its loading stages
    And the follow stream ends with the worker idle, registered by its callback
    And the worker streams tokens for a prompt
    And its log file is under RBEE_HOME/logs

  Scenario: A port in use is skipped and the retry narrated
    Given a running hive with the stand-in worker program
    And something listens on the hive's first worker port
    When I spawn a worker for a tiny model on cpu device 0
    Then the worker listens on the next port
    And the hive narrated that the first port is in use

  Scenario: A worker that crashes while starting is reported with its last log lines
    Given a running hive with a worker program that fails to load models
    When I spawn a worker for a tiny model on cpu device 0
    Then following it ends with WORKER_STARTUP_FAILED
    And the error carries the last lines of the worker's log and where the log is
    And the hive has no worker

  Scenario: Listing filters by model and state
    Given a running hive with the stand-in worker program
    And two idle workers for models "file:///a" and "file:///b"
    Then listing by model "file:///a" shows only that worker
    And listing by state idle shows both
    And listing by state loading shows none

  Scenario: Shutting down one worker by id
    Given a running hive with the stand-in worker program
    And two idle workers for models "file:///a" and "file:///b"
    When I shut down the worker for "file:///a" by its id
    Then its process has exited with code 0
    And only the worker for "file:///b" is listed
