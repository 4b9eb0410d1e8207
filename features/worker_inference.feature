# S9 Inference (worker side, and rbee-keeper's direct mode), S10 input checks on Generate.
Feature: Streaming an answer from a worker
  A loaded worker turns a prompt into a stream of tokens. Each message carries
  only the new tokens and the index where they start; one final event closes
  the stream with why it ended, how many tokens there were and how long it took.
  rbee-keeper prints the tokens, and only the tokens, on stdout as they arrive.

  Background:
    Given a worker with the default model loaded

  Scenario: Tokens arrive in order, then one final event
    When a client asks for 12 tokens greedily
    Then the token indices start at 0 and have no gaps
    And the stream ends with exactly one final event
    And the final event counts the streamed tokens and gives a finish reason and a duration

  Scenario: Greedy answers are the same every time
    When a client asks for 12 tokens greedily
    And a client asks for 12 tokens greedily again
    Then both answers have the same token ids

  Scenario: rbee-keeper prints the tokens and nothing else on stdout
    When I run rbee-keeper infer against the worker for 12 tokens greedily
    Then rbee-keeper exits with code 0
    And its stdout is exactly the text the worker streams for the same request
    And its last line on stderr gives the token count and tokens per second

  Scenario: Cancelling a request ends its stream and frees its slot
    Given a long request is streaming
    When the client cancels it by its request id
    Then the stream ends with finish reason "abort"
    And the worker shows no busy slot

  Scenario: Cancelling twice, or an id the worker never saw, is not an error
    Given a long request is streaming
    When the client cancels it by its request id
    And the client cancels it again
    And the client cancels a request id the worker never saw
    Then no cancel failed
    And only the first cancel stopped a running request

  Scenario: A client that goes away frees its slot
    Given a long request is streaming
    When the client closes its connection
    Then the worker frees the slot and logs that the client disconnected

  Scenario: Ctrl+C in rbee-keeper cancels the request on the worker
    Given rbee-keeper is streaming a long answer from the worker
    When the user presses Ctrl+C
    Then rbee-keeper exits with code 130
    And rbee-keeper says the worker confirmed the cancel
    And the worker shows no busy slot

  Scenario Outline: The worker refuses sampling values it cannot use, naming the field
    When a client sends a request with <field> set to <value>
    Then the request fails with INVALID_ARGUMENT naming the field "<field>"

    Examples:
      | field       | value |
      | max_tokens  | 0     |
      | max_tokens  | -5    |
      | temperature | -1    |
      | top_p       | 1.5   |
      | prompt      | ""    |

  Scenario: A request longer than the model's context is refused with the figures
    When a client asks for 100000 tokens
    Then the request fails with INVALID_ARGUMENT naming the field "max_tokens"
    And the error gives the prompt tokens, the max tokens and the model's context length
