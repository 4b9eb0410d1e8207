# S8 Daemon lifecycles (hive): supervision, idle timeout, SIGTERM cascade.
Feature: The hive supervises its workers and stops them all on SIGTERM
  Workers are health-checked on an interval; three failures in a row remove
  a worker and stop its processes. Idle workers are shut down after the idle
  timeout while the hive keeps running. On SIGTERM the hive shuts every worker
  down in parallel, force-kills those that do not exit in time, and exits 0.

  Scenario: A worker that stops answering is removed after three failed checks
    Given a running hive checking health every 0.5 seconds
    And an idle worker with a child process
    When the worker is stopped with SIGSTOP
    Then the hive narrates 3 failed health checks of that worker
    And the worker is removed and its process tree is gone

  Scenario: An idle worker is shut down after the idle timeout and the hive stays up
    Given a running hive with an idle timeout of 1.5 seconds
    And an idle worker with a child process
    Then the hive narrates that the worker has been idle and shuts it down
    And the worker is removed and its process tree is gone
    And the hive still spawns a new worker

  Scenario: A worker that dies is removed and the event logged
    Given a running hive with the stand-in worker program
    And an idle worker with a child process
    When the worker is killed with SIGKILL
    Then the hive narrates that the worker died, killed by SIGKILL
    And the worker is removed and its process tree is gone

  Scenario: SIGTERM stops every worker, force-killing one that ignores shutdown
    Given a running hive with a shutdown grace of 2 seconds
    And an idle worker with a child process
    And an idle worker that ignores shutdown, with a child process
    When the hive receives SIGTERM
    Then the hive exits with code 0
    And it narrated shutting down 2 workers, waiting, force-killing one, and terminated
    And no process of either worker remains
