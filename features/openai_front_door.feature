# The cluster's front door: the queen's OpenAI-compatible HTTP API, driven as
# an application would (the official openai client, raw HTTP). The queen's
# hives run the stand-in worker program (the real worker contract without an
# engine) so cold starts are cheap here; the real engine behind the front
# door: tests/integration/test_openai_front_door.py.
Feature: Applications that speak OpenAI's API use the whole cluster through the queen
  A chat UI, an editor or a script points its OpenAI client at the queen's
  HTTP port with a key. The queen finds a worker for the model anywhere in the
  cluster, or starts one, and streams its tokens back in OpenAI's own shapes.

  Background:
    Given the hub-like server serves the model "hf:rbee-test/tiny"

  Scenario: Two first requests for a model share one cold start and see its stages while they wait
    Given a running queen serving its HTTP API, whose hives run the stand-in worker and download from the hub-like server
    And this machine is registered as the local node "here"
    When two applications stream a chat with the model "hf:rbee-test/tiny" at the same time
    Then both streams show loading comments before their first data event
    And both streams carry the stand-in's answer in chat chunks and end with "data: [DONE]"
    And one worker process runs for node "here"
    And the model list names "hf:rbee-test/tiny" once, loaded on "here" and downloaded on "here"
    And a chat with the short name "tiny" gets the stand-in's answer from the warm worker

  Scenario: A cold start that outlasts the wait is a 503 with Retry-After, and the next request is served
    Given a running queen serving its HTTP API that waits at most 1s for a cold start, whose workers take 6 s to load
    And this machine is registered as the local node "here"
    When an application asks for a chat with the model "hf:rbee-test/tiny" without streaming
    Then it gets status 503 with a Retry-After header and an error in OpenAI's shape
    And once the worker is loaded, the same request gets the stand-in's answer

  Scenario: The key is checked before anything else; health answers anyone
    Given a running queen serving its HTTP API, whose hives run the stand-in worker and download from the hub-like server
    When an application asks for the model list without a key
    Then it gets status 401 with an error in OpenAI's shape
    And the client library raises its AuthenticationError for a wrong key
    And GET /health answers 200 without a key
