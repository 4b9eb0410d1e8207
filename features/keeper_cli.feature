# S11 CLI and configuration (the original design's CLI feature file, restated
# for this project), S9 connection retries and S2 output rules as a user of
# `rbee-keeper` meets them: the installed console script run as a process, a
# temporary HOME for each scenario, nothing written outside it.
Feature: rbee-keeper is one consistent command line for people and scripts
  Every command is found under the names S11 gives, answers --help with an
  example, exits 0 on success, 1 on an error (with a stable code and what to
  do next) and 130 when interrupted. Settings come from the command line, then
  the environment, then the first config file found (RBEE_CONFIG,
  ~/.config/rbee/config.toml, /etc/rbee/config.toml). Results go to stdout,
  narration to stderr.

  Scenario Outline: Every command of S11 exists and its help has an example
    When I run "rbee-keeper <command> --help"
    Then the exit code is 0
    And stdout contains "Example: rbee-keeper"

    Examples:
      | command            |
      | infer              |
      | setup add-node     |
      | setup update-node  |
      | setup remove-node  |
      | setup list-nodes   |
      | setup install      |
      | workers list       |
      | workers health     |
      | workers shutdown   |
      | models list        |
      | models download    |
      | models rm          |
      | models deploy      |
      | models undeploy    |
      | logs               |
      | install            |
      | status             |

  Scenario: The version is printed on stdout and nothing else
    When I run "rbee-keeper --version"
    Then the exit code is 0
    And stdout is "rbee-keeper 0.1.0"
    And stderr is empty

  Scenario: An unknown option is a usage error with exit code 1
    When I run "rbee-keeper models list --no-such-option"
    Then the exit code is 1
    And stderr contains "USAGE_ERROR"
    And stdout is empty

  Scenario: install puts the programs on PATH and writes a default config once
    When I run "rbee-keeper install"
    Then the exit code is 0
    And "~/.local/bin/rbee-keeper" is a link to the installed program
    And "~/.config/rbee/config.toml" exists
    And "~/.local/share/rbee/models" is a folder
    When I change "~/.config/rbee/config.toml"
    And I run "rbee-keeper install"
    Then the exit code is 0
    And "~/.config/rbee/config.toml" still holds my change
    And stderr contains "Kept the existing config file"

  Scenario: A default node in the config file is used when --node is left out
    Given the config file "~/.config/rbee/config.toml" says:
      """
      [keeper]
      node = "workstation"
      queen = "127.0.0.1:{free port}"
      queen_api_key = "k"
      """
    When I run "rbee-keeper --verbose models list"
    Then the exit code is 1
    And stderr contains "CONNECTION_TIMEOUT: Cannot reach the queen at 127.0.0.1:"
    And stderr contains "after 3 attempts"

  Scenario: The environment beats the config file and a flag beats both
    Given the config file "~/.config/rbee/config.toml" says:
      """
      [keeper]
      queen = "127.0.0.1:{free port A}"
      queen_api_key = "k"
      """
    When I run "rbee-keeper setup list-nodes" with RBEE_QUEEN="127.0.0.1:{free port B}"
    Then the queen it tried was "{free port B}"
    When I run "rbee-keeper setup list-nodes --queen 127.0.0.1:{free port C}" with RBEE_QUEEN="127.0.0.1:{free port B}"
    Then the queen it tried was "{free port C}"

  Scenario: A bad config file names the file, the key and what was expected
    Given the config file "~/.config/rbee/config.toml" says:
      """
      [keeper]
      node = 42
      """
    When I run "rbee-keeper models list --hive 127.0.0.1:9 --api-key k"
    Then the exit code is 1
    And stderr contains "INVALID_CONFIG"
    And stderr contains "config.toml: [keeper] node must be a string (got 42)"

  Scenario: A daemon that answers late is reached by the second or third attempt
    Given a gRPC server that starts listening on a free port after 300 ms
    When the keeper connects to it as a hive
    Then it is connected after 2 retries

  Scenario: A daemon that never answers is CONNECTION_TIMEOUT after 3 attempts
    When I run "rbee-keeper models list --hive 127.0.0.1:{free port} --api-key k"
    Then the exit code is 1
    And stderr contains "did not answer"
    And stderr contains "CONNECTION_TIMEOUT"
    And stderr contains "after 3 attempts"
    And stdout is empty

  Scenario: --quiet leaves only the error on stderr
    When I run "rbee-keeper --quiet models list --hive 127.0.0.1:{free port} --api-key k"
    Then the exit code is 1
    And stderr contains "CONNECTION_TIMEOUT"
    And stderr does not contain "did not answer"
