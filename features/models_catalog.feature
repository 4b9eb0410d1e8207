# S5.1 Model catalog (models.db), S10 model reference validation.
Feature: The node's model catalog
  Each hive keeps a catalog of the models on its disk: where they are, how big,
  in which format, with what header metadata. A model enters the catalog only
  complete and verified; removing it deletes its files. Model references are
  checked before anything is sent.

  Background:
    Given a hub serving the repository "acme/tiny" with a 3.0 MB safetensors model
    And a hive on this node whose hub is that server

  Scenario: A downloaded model is listed and removed with its files
    When I run rbee-keeper models download "hf:acme/tiny"
    Then rbee-keeper exits with 0
    And stdout holds the model's folder on the node
    And rbee-keeper models list shows "hf:acme/tiny" as safetensors of 3.0 MB
    When I run rbee-keeper models rm "hf:acme/tiny"
    Then rbee-keeper exits with 0
    And the model's folder is gone
    And rbee-keeper models list shows no models

  Scenario Outline: References in any other form are refused before anything is sent
    When I run rbee-keeper models download "<reference>" against a hive that is not running
    Then rbee-keeper exits with 1
    And stderr says "INVALID_MODEL_REF: Invalid model reference format: '<reference>'"
    And stderr lists the accepted forms

    Examples:
      | reference        |
      | gpt2             |
      | hf:only-org      |
      | file://relative  |
      | hf:acme/tiny/../x |
      | s3://bucket/model |

  Scenario: GGUF header metadata is stored with the model
    Given the hub also serves a GGUF file "acme/tiny-gguf/tiny.Q8_0.gguf" with vocabulary 100 and EOS id 7
    When the hive is asked for "hf:acme/tiny-gguf/tiny.Q8_0.gguf"
    Then the catalog entry has format "gguf"
    And its metadata says architecture "llama", vocabulary 100, EOS id 7, quantization "Q8_0"

  Scenario: A kill -9 in the middle of a download leaves the catalog intact
    Given the model "hf:acme/tiny" is already in the catalog
    And the hub serves a 12 MB model "acme/big" that pauses half-way
    When the hive is downloading "hf:acme/big"
    And the hive is killed with SIGKILL
    Then the catalog file passes SQLite's integrity check
    And the catalog holds "hf:acme/tiny" and nothing for "hf:acme/big"
    When the hive is started again and asked for "hf:acme/big"
    Then the download resumes from the bytes on disk and completes
