# S7 Worker lifecycle (the worker's part), S8 worker draining, S9 busy, S10 authentication and validation.
Feature: A worker's life: loading, serving, refusing, draining
  A worker answers on its port before its model is loaded, so whoever started
  it can follow the loading. Once loaded it serves as many requests at once as
  it has slots and refuses the next one at once, with the figures. It only
  talks to clients holding its key. Told to shut down, it finishes what it is
  doing, takes nothing new, and exits cleanly.

  Scenario: The server answers before the model is loaded
    Given a worker with one slot has just been started
    Then its readiness answers "loading" with the current loading stage
    And its health check answers NOT_SERVING
    And a request sent now is refused with MODEL_LOADING

  Scenario: The loading stream reports stages until the worker is idle
    Given a worker with one slot has just been started
    When I follow its loading progress
    Then I see loading stages in order, each with how many of how many are done
    And the last message says the worker is idle
    And its readiness answers "idle" with the model loaded and 0 of 1 slots busy
    And its health check answers SERVING

  Scenario: A worker with every slot taken refuses at once, with the figures
    Given a worker with one slot has just been started
    And the worker is loaded
    And a long request is streaming on it
    When another request is sent
    Then it is refused with ALL_SLOTS_BUSY, 1 slot total and 1 busy
    When I run rbee-keeper infer against that worker
    Then rbee-keeper retries after 1, 2 and 4 seconds, saying how busy the worker is
    And rbee-keeper exits with code 1, suggesting to wait, start another worker or raise the slots
    And rbee-keeper printed nothing on stdout

  Scenario Outline: Only clients with the worker's key are served
    Given a worker with the default model loaded
    When a client calls GetReadiness <with_key>
    Then the call fails with <code>

    Examples:
      | with_key          | code            |
      | without a key     | MISSING_API_KEY |
      | with a wrong key  | INVALID_API_KEY |

  Scenario: The health check needs no key
    Given a worker with the default model loaded
    Then its health check answers SERVING to a client without a key

  Scenario: rbee-keeper says which host refused the key and where the key came from
    Given a worker with the default model loaded
    When I run rbee-keeper infer against the worker with a wrong key in RBEE_API_KEY
    Then rbee-keeper exits with code 1
    And the error names the worker's address and RBEE_API_KEY as the key's source

  Scenario Outline: rbee-keeper refuses bad input before contacting anything
    When I run rbee-keeper infer against a closed port with <option> <value>
    Then rbee-keeper exits with code 1
    And the error is <code> and names <option>
    And rbee-keeper did not try to connect

    Examples:
      | option        | value | code             |
      | --max-tokens  | 0     | INVALID_ARGUMENT |
      | --temperature | -0.5  | INVALID_ARGUMENT |
      | --top-p       | 0     | INVALID_ARGUMENT |
      | --backend     | tpu   | INVALID_BACKEND  |
      | --device      | -1    | INVALID_DEVICE   |
      | --model       | bad   | INVALID_MODEL_REF |

  Scenario: A draining worker finishes its request, refuses new ones as busy, then exits
    Given a worker with one slot has just been started
    And the worker is loaded
    And a request of 60 tokens is streaming on it
    When the worker is told to shut down
    Then its readiness answers "draining"
    And a new request is refused with WORKER_DRAINING as busy
    And the streaming request still finishes with finish reason "length"
    And the worker process exits with code 0
    And its engine processes are gone and its log tells a clean stop
