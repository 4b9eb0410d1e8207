# S1 (the happy path: cold start, warm start, an unknown node) through a real
# queen-rbee: `rbee-keeper infer --node NAME --model hf:ORG/REPO` on this
# machine registered as a local node. The queen starts the node's hive; the
# hive downloads from the hub-like server on 127.0.0.1 and spawns the stand-in
# worker program (the real worker contract without an engine; the real engine
# on this path: tests/integration/test_queen_engine.py).
Feature: One keeper command gets tokens from a worker on a node, the queen doing everything in between
  The keeper asks the queen for a worker; the queen finds the node, makes sure
  its hive runs, and either hands out an idle worker that already serves the
  model (warm start) or has the hive fetch the model, register it and spawn a
  worker (cold start). The keeper then streams the tokens straight from the
  worker: tokens on stdout, every step narrated on stderr by the program that
  took it.

  Background:
    Given the hub-like server serves the model "hf:rbee-test/tiny"
    And a running queen whose hives run the stand-in worker and download from the hub-like server

  Scenario: Cold start on a registered node: hive started, model downloaded and registered, worker spawned
    Given this machine is registered as the local node "here"
    When I run infer on node "here" with the model "hf:rbee-test/tiny"
    Then the keeper exits 0
    And stdout is the worker's tokens and nothing else, ending with a newline
    And stderr holds only narration lines, from the actors queen-rbee, rbee-hive, llm-worker-rbee, model-loader and rbee-keeper
    And the narration showed, in order, "[queen-rbee] 📋 Task: hf:rbee-test/tiny on here (cpu:0)", "[queen-rbee] 💤 No hive answers at", "[queen-rbee] 🚀 Starting rbee-hive on here", "rbee-hive started on here (pid", "[queen-rbee] 🧊 Cold start: no worker serves hf:rbee-test/tiny on here yet", "Hive version 0.1.0 is compatible", "[rbee-hive] 📚 Looking up hf:rbee-test/tiny in the model catalog", "[rbee-hive] 📥 Downloading hf:rbee-test/tiny from http://127.0.0.1:", "[rbee-hive] ✅ Downloaded hf:rbee-test/tiny", "[rbee-hive] 📦 hf:rbee-test/tiny is in the catalog at", "[rbee-hive] ✅ Preflight passed for hf:rbee-test/tiny", "[rbee-hive] 🚀 Starting llm-worker-rbee", "[llm-worker-rbee] ", "called back", "[rbee-keeper] 🎯 Cold start: worker", "Model loaded"
    And the download progress was narrated on stderr with percent, bytes and speed
    And the hub-like server was asked for the model's files
    And the hive of node "here" lists "hf:rbee-test/tiny" in its model catalog
    And one hive and one worker process run for node "here"

  Scenario: The same request again is a warm start on the idle worker
    Given this machine is registered as the local node "here"
    And an infer on node "here" has cold-started a worker
    When I run infer on node "here" with the model "hf:rbee-test/tiny"
    Then the keeper exits 0
    And stdout is the worker's tokens and nothing else, ending with a newline
    And the narration says the warm start is on the worker the cold start spawned
    And the keeper took under 5 s from its start to its exit
    And the narration does not say "Starting rbee-hive"
    And the narration does not say "Cold start"
    And the narration does not say "⏬"
    And the hub-like server got no new download request
    And no new worker process was started for node "here"

  Scenario: A node that is not registered is refused with the command that registers it
    When I run infer on node "nowhere" with the model "hf:rbee-test/tiny"
    Then the keeper refuses with NODE_NOT_FOUND and the message "No node named 'nowhere' is registered with the queen"
    And the refusal suggests "rbee-keeper setup add-node --name nowhere"
    And the hub-like server got no request

  Scenario: A hive that died under a running queen is started again by the next infer, which cold-starts a new worker
    Given this machine is registered as the local node "here"
    And an infer on node "here" has cold-started a worker
    When the hive of node "here" and its worker are killed
    And I run infer on node "here" with the model "hf:rbee-test/tiny"
    Then the keeper exits 0
    And stdout is the worker's tokens and nothing else, ending with a newline
    And the narration showed, in order, "No hive answers at", "Starting rbee-hive on here", "Cold start: no worker serves", "Cold start: worker"
    And the worker it started is a new one, and the queen lists only that one
    And the model was not downloaded again: the catalog on the node's disk outlived its hive
