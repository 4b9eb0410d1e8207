# S5.2 Model provisioner (downloads), S2 progress.
Feature: Downloading models from the hub
  The hive fetches models with huggingface_hub and reports progress (stage,
  bytes, speed) to whoever asked. Network trouble is retried with backoff,
  resuming from what is on disk; hub refusals and full disks end the download
  with a clear error and exit code 1. Nothing half-written is registered.

  Background:
    Given a hub serving the repository "acme/tiny" with a 3.0 MB safetensors model
    And a hive on this node whose hub is that server

  Scenario: Progress reaches rbee-keeper with percent, size and speed
    When I run rbee-keeper models download "hf:acme/tiny"
    Then rbee-keeper exits with 0
    And stderr shows download progress ending at 100.0% of 3.0 MB with a speed

  Scenario Outline: The hub refuses
    Given the hub holds "<repo>" as a <access> repository
    When I run rbee-keeper models download "hf:<repo>"
    Then rbee-keeper exits with 1
    And stderr says "<code>"
    And stderr says "<hint>"
    And nothing is registered for "hf:<repo>"

    Examples:
      | repo           | access  | code            | hint                          |
      | acme/missing   | missing | MODEL_NOT_FOUND | repository acme/missing does not exist |
      | acme/private   | private | ACCESS_DENIED   | Set HF_TOKEN                  |
      | acme/gated     | gated   | ACCESS_DENIED   | Set HF_TOKEN                  |

  Scenario: A stalled transfer is retried and resumes
    Given the hub stalls "acme/tiny" once after 1000000 bytes
    When I run rbee-keeper models download "hf:acme/tiny"
    Then rbee-keeper exits with 0
    And stderr says "retry 1/6"
    And the retry asked the hub for the bytes from 1000000 on

  Scenario: A transfer that never gets through times out after six narrated retries
    Given the hub stalls "acme/tiny" every time after 500000 bytes
    When I run rbee-keeper models download "hf:acme/tiny"
    Then rbee-keeper exits with 1
    And stderr narrates retries 1 to 6 with growing waits
    And stderr says "DOWNLOAD_TIMEOUT"
    And nothing is registered for "hf:acme/tiny"

  Scenario: A reset connection resumes from the bytes on disk
    Given the hub cuts the connection of "acme/tiny" once after 2000000 bytes
    When I run rbee-keeper models download "hf:acme/tiny"
    Then rbee-keeper exits with 0
    And stderr says "connection lost"
    And the retry asked the hub for the bytes from 2000000 on

  Scenario: Bytes that do not match the hub's checksum are deleted and fetched again
    Given the hub corrupts the body of "acme/tiny" once
    When I run rbee-keeper models download "hf:acme/tiny"
    Then rbee-keeper exits with 0
    And stderr says "checksum mismatch, partial file deleted"
    And the model on disk matches the hub's bytes

  Scenario: Two requests for the same model share one download
    Given the hub pauses "acme/tiny" after 1000000 bytes
    When two rbee-keeper downloads of "hf:acme/tiny" run at once
    Then both exit with 0 and print the same folder
    And the second one says it follows the download already running
    And the hub sent the model's bytes once

  Scenario: Not enough disk space is refused before the download starts
    Given the hive's models folder is a 2 MB filesystem
    When I run rbee-keeper models download "hf:acme/tiny"
    Then rbee-keeper exits with 1
    And stderr says "INSUFFICIENT_DISK"
    And stderr says "rbee-keeper models rm"
    And the hub sent no model bytes

  Scenario: A disk that fills up during the download
    Given the hive's models folder is a 2 MB filesystem
    And the hub serves a 1.5 MB model "acme/mid" that pauses after 300000 bytes
    When I start rbee-keeper models download "hf:acme/mid"
    And the disk fills up while the download is paused
    Then rbee-keeper exits with 1
    And stderr says "Disk full during download of hf:acme/mid"
    And no partial file is left
    And nothing is registered for "hf:acme/mid"
