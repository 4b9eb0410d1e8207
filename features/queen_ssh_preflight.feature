# S4.1 SSH preflight (queen → node): `rbee-keeper setup check-node --ssh-only`,
# against a real queen-rbee and nodes on 127.0.0.1 (OpenSSH's sshd or asyncssh's
# server, each running commands for real).
Feature: Before it starts anything on a node, the queen checks its SSH link
  The SSH preflight checks, in this order, that the node is reachable, that
  the queen can log in with the node's key, that a command runs there (`echo
  test` answers `test`), how long a round trip takes, and that the hive
  program is installed where the node's install path says. Each result is
  narrated; the first failure stops the preflight with what to do next.

  Scenario: Every SSH check passes on a node where rbee is installed
    Given a running queen
    And OpenSSH's sshd on 127.0.0.1 where rbee is installed, whose host key the queen knows
    And the node "box" is registered with rbee installed
    When I check node "box" over SSH only
    Then the keeper exits 0
    And the queen narrated, in order, "attempt 1/3", "box is reachable", "Authenticated as", "`echo test` returned `test`", "SSH latency: ", "rbee-hive 0.1.0 found at"
    And the latency is reported in milliseconds, a warning only above 100ms
    And the preflight started no hive
    And node "box" is registered as reachable, last connected just now

  Scenario: A round trip above the warning threshold is reported as a warning, not a failure
    Given a running queen that warns about SSH latency above 0ms
    And an SSH node where rbee is installed, whose host key the queen knows
    And the node "slow" is registered with rbee installed
    When I check node "slow" over SSH only
    Then the keeper exits 0
    And the latency is reported in milliseconds as a warning "above 0ms"

  Scenario: A node without the hive program stops the preflight with the install command
    Given a running queen
    And an SSH node whose host key the queen knows
    And the node "bare" is registered with install path "/opt/rbee-not-installed"
    When I check node "bare" over SSH only
    Then the keeper refuses with HIVE_NOT_INSTALLED and the message "/opt/rbee-not-installed/.venv/bin/rbee-hive: command not found"
    And the queen narrated, in order, "bare is reachable", "Authenticated as", "`echo test` returned `test`", "SSH latency: ", "rbee-hive not found at"
    And the refusal suggests "rbee-keeper setup install --node bare"

  Scenario: A node that stopped answering fails the first check and nothing after it
    Given a running queen
    And an SSH node whose host key the queen knows
    And the node "gone" is registered with install path "/opt/rbee-gone"
    When the node's SSH server stops
    And I check node "gone" over SSH only
    Then the keeper refuses with SSH_CONNECTION_FAILED and the message "failed after 3 attempts"
    And the narration does not say "Authenticated as"
    And node "gone" is registered as unreachable with last error "SSH_CONNECTION_FAILED"

  Scenario: A node that no longer accepts the key passes "reachable" and fails "authenticated"
    Given a running queen
    And an SSH node whose host key the queen knows
    And the node "locked" is registered with install path "/opt/rbee-locked"
    When the node stops accepting the queen's key
    And I check node "locked" over SSH only
    Then the keeper refuses with SSH_AUTH_FAILED and the message "SSH authentication to 127.0.0.1 as"
    And the queen narrated, in order, "locked is reachable", "SSH authentication to 127.0.0.1"
    And the narration does not say "`echo test` returned `test`"
    And only attempt 1/3 was narrated
