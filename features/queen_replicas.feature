# The queen keeps models running (docs/queen.md, "Replicas"): `rbee-keeper
# models deploy|undeploy` and `models list --deployed` through a real
# queen-rbee, two local nodes (this machine, each with its own home and hive
# port) whose hives run the stand-in worker program.
Feature: The queen keeps N workers of a deployed model running
  A deployment is a wish the queen keeps in its database: N workers of a
  model, on the nodes allowed. The queen starts the missing ones where they
  fit, spread over the nodes, replaces a worker that dies after a short
  backoff, shows the wish in `models list --deployed`, and stops the workers
  when the model is undeployed. (That the wish outlives the queen, and a lost
  or removed node's replica is placed again: tests/integration/test_queen_replicas.py.)

  Background:
    Given the hub-like server serves the model "hf:rbee-test/tiny"

  Scenario: Two replicas spread over two nodes, a killed one is replaced, undeploy stops them
    Given a running queen that keeps deployments, with restarts after 0.5s
    And this machine is registered as the local nodes "a" and "b"
    When I deploy "hf:rbee-test/tiny" with 2 replicas
    Then the keeper exits 0
    And two workers of "hf:rbee-test/tiny" are ready within 90 s, one on "a" and one on "b"
    And the deployments list shows "hf:rbee-test/tiny" with 2/2 ready on any node, complete
    When the worker of the deployment on "a" is killed with SIGKILL
    Then two workers of "hf:rbee-test/tiny" are ready again within 90 s, the killed one not among them
    And the queen's log says the killed worker is gone and that another starts after a backoff
    When I undeploy "hf:rbee-test/tiny"
    Then the keeper exits 0
    And no worker of "hf:rbee-test/tiny" runs within 90 s
    And the deployments list says no model is deployed

  Scenario: A replica count out of bounds is refused before anything is stored
    Given a running queen that keeps deployments, with restarts after 0.5s
    When I deploy "hf:rbee-test/tiny" with 0 replicas
    Then the keeper exits 1 with INVALID_ARGUMENT and a suggestion naming "rbee-keeper models deploy"
    And the deployments list says no model is deployed
