# S6.2 The queen's global worker registry: `rbee-keeper workers list` through
# a real queen-rbee, fed by the hives of local nodes (this machine) as a stream
# of changes. Workers are the stand-in worker program, spawned by an infer.
Feature: The queen knows every worker on every node
  Each hive reports its workers to the queen as a stream of changes (with
  heartbeats in between). The queen lists them all, each with its node and its
  capability (`cpu`, `cuda:1`), filters them by node and capability, rebuilds
  the list from the hives when it is restarted, and drops the workers of a
  hive it has not heard from for longer than its stale setting (120 s unless
  configured; a short one here).

  Background:
    Given the hub-like server serves the model "hf:rbee-test/tiny"

  Scenario: Workers are listed with their node and capability, and filtered by node and capability
    Given a running queen whose hives run the stand-in worker and download from the hub-like server
    And this machine is registered as the local node "here"
    And an infer on node "here" has cold-started a worker
    When I list the workers through the queen as JSON
    Then the keeper exits 0
    And stdout holds one JSON object: the worker the infer started, on node "here" with capability "cpu", idle, serving "hf:rbee-test/tiny", with its hive's address and the pid of a running process
    And listing with "--node here" gives that worker only
    And listing with "--capability cpu" gives that worker only
    And listing with "--node elsewhere" gives no worker
    And listing with "--capability cuda" gives no worker
    When I list the workers through the queen
    Then the keeper exits 0
    And the table has the columns NODE, ID, STATE, MODEL, DEVICE, ADDRESS, SLOTS FREE and LOAD, and one row: the worker on "here", idle, cpu, 8/8 slots free

  Scenario: A queen without workers says so on stderr and leaves stdout empty
    Given a running queen whose hives run the stand-in worker and download from the hub-like server
    When I list the workers through the queen
    Then the keeper exits 0
    And stdout is empty and the narration says "No workers on any node known to the queen at" with the queen's address

  Scenario: A queen restarted after a crash rebuilds the list from the nodes' hives
    Given a running queen whose hives run the stand-in worker and download from the hub-like server, keeping its registry in "shared"
    And this machine is registered as the local node "here"
    And an infer on node "here" has cold-started a worker
    When the queen is killed with SIGKILL
    And a new queen starts on the registry in "shared"
    Then the new queen lists the worker the infer started, on node "here", without any infer
    And the hive and the worker of node "here" are the processes that ran before the crash

  Scenario: A hive that goes silent has its workers dropped after the stale setting; they are back when it answers again
    Given a running queen whose hives run the stand-in worker and download from the hub-like server, dropping workers after 2s without word from their hive
    And this machine is registered as the local node "here"
    And an infer on node "here" has cold-started a worker
    When the hive of node "here" is stopped with SIGSTOP
    Then the queen lists no worker within 30 s, and not before the stale setting has passed
    And the queen's log says "No word from the hive of here for 2s: its workers are dropped from the registry"
    And the worker of node "here" still runs
    When the hive of node "here" is resumed with SIGCONT
    Then the queen lists the worker the infer started again within 30 s
