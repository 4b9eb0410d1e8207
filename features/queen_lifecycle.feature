# S8 Daemon lifecycles, the queen's part: persistent mode (`queen-rbee daemon`
# started by an operator) and ephemeral mode (the keeper starts a queen for one
# command), the cascade queen → hives → workers, and what SIGTERM to a queen
# stops. Real queen-rbee processes, local nodes (this machine), the stand-in
# worker program; every "running" and "gone" is a check of the processes.
Feature: The queen runs for an operator or for one command, and stops only what it started
  A persistent queen is never stopped by the keeper: after a command the
  queen, the hives and the idle workers keep running, ready for the next
  request. When no queen answers, `infer` starts one for the command and stops
  it afterwards; that queen stops the hives it started, which stop their
  workers, so nothing is left running. A queen stopped with SIGTERM stops the
  hives it started and leaves alone the ones it found running.

  Background:
    Given the hub-like server serves the model "hf:rbee-test/tiny"

  Scenario: Persistent mode: after infer the queen, the hive and the idle worker keep running
    Given a running queen whose hives run the stand-in worker and download from the hub-like server
    And this machine is registered as the local node "here"
    When I run infer on node "here" with the model "hf:rbee-test/tiny"
    Then the keeper exits 0
    And the narration does not say "Stopping the queen"
    And the queen process still runs and answers
    And one hive and one worker process run for node "here"
    And the queen lists the worker on node "here" as idle

  Scenario: Ephemeral mode: with no queen answering, infer starts one for the command and nothing is left running afterwards
    Given this machine was registered as the local node "here" with a queen that has since stopped
    When I run infer on node "here" with no queen answering at that queen's address
    Then the keeper exits 0
    And stdout is the worker's tokens and nothing else, ending with a newline
    And the narration showed, in order, "No queen answers at", "starting one for this command (ephemeral; log", "Starting rbee-hive on here", "Cold start: worker", "Stopping the queen started for this command"
    And no queen process runs for that address
    And no hive and no worker process run for node "here"
    And the log of the queen started for the command says it stopped the hive it had started on "here"

  Scenario: SIGTERM to a persistent queen stops the hives it started and leaves alone a hive it found running
    Given a running queen whose hives run the stand-in worker and download from the hub-like server, keeping its registry in "shared"
    And this machine is registered as the local nodes "found" and "mine"
    And an infer on node "found" has cold-started a worker
    When the queen is killed with SIGKILL
    And a new queen starts on the registry in "shared"
    And I run infer on node "found" with the model "hf:rbee-test/tiny"
    Then the keeper exits 0
    And the narration says "rbee-hive on found answers at"
    And the narration does not say "Starting rbee-hive"
    When I run infer on node "mine" with the model "hf:rbee-test/tiny"
    Then the keeper exits 0
    And the narration says "Starting rbee-hive on mine"
    When the queen is sent SIGTERM
    Then the queen exits 0
    And the queen's log says it stopped the hive it started on "mine", and nothing about "found"
    And no hive and no worker process run for node "mine"
    And the hive and the worker of node "found" are the processes that ran before
