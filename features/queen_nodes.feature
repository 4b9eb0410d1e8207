# S3 Node registry and SSH (the queen's side), S11 `rbee-keeper setup`, and the
# queen's half of S4.2 (check-node starts a hive and preflights it). A real
# queen-rbee process, the keeper's console script, and nodes on 127.0.0.1:
# asyncssh's SSH server running each command for real, or OpenSSH's sshd.
Feature: The queen keeps a registry of nodes and reaches them over SSH
  A node is saved only once the queen has reached it over SSH, with the
  node's own key and a host key it could verify, and has run a command there.
  Whatever goes wrong, the keeper says what failed, with the values involved
  and the command to type next, and exits 1; nothing half-checked is saved.

  Background:
    Given a running queen

  Scenario: A node added over SSH is tested and saved; rbee is installed there step by step
    Given an SSH node whose host key the queen knows
    When I add the node "box" with the keeper
    Then the keeper exits 0
    And the queen narrated, in order, "Testing the connection to box", "attempt 1/3", "box is reachable", "Authenticated as", "`echo test` returned `test`", "SSH latency: "
    And the narration says rbee is not installed on "box" yet and suggests "rbee-keeper setup install --node box"
    And node "box" is registered as reachable with no backends yet
    When I install rbee on node "box"
    Then the keeper exits 0
    And each install step was narrated with its duration: checking git and python3, fetching the repository, setting up the Python environment, verifying the hive program
    And the narration says "rbee installed on box: rbee-hive 0.1.0"
    And node "box" is registered as reachable with backends cpu: 1

  Scenario: A node where rbee is already installed has its backends detected when it is added
    Given an SSH node where rbee is installed, whose host key the queen knows
    When I add the node "ready" with the keeper
    Then the keeper exits 0
    And the narration says "Detected on ready: cpu (1 device)"
    And node "ready" is registered as reachable with backends cpu: 1

  Scenario: A key file that does not exist is caught by the keeper before anything is sent
    Given an SSH node whose host key the queen knows
    When I add the node "box" with a key file that does not exist
    Then the keeper refuses with SSH_KEY_NOT_FOUND and the message "SSH key not found: " followed by the path
    And the SSH node saw no authentication attempt and the queen was not asked to connect
    And no node is registered

  Scenario: A host that never answers is tried 3 times, each attempt narrated, then given up
    Given a TCP listener on 127.0.0.1 that never speaks SSH
    When I add the node "mute" at the listener's port
    Then the keeper refuses with SSH_CONNECTION_FAILED and the message "failed after 3 attempts"
    And attempts 1/3, 2/3 and 3/3 were narrated, each ending in "timed out after 2 s"
    And the error names the host 127.0.0.1 and the listener's port
    And no node is registered

  Scenario: A closed port is refused after 3 attempts
    Given a port on 127.0.0.1 where nothing listens
    When I add the node "closed" at that port
    Then the keeper refuses with SSH_CONNECTION_FAILED and the message "failed after 3 attempts: connection refused"
    And attempts 1/3, 2/3 and 3/3 were narrated
    And no node is registered

  Scenario: A key the node does not accept fails at once, without a retry
    Given an SSH node whose host key the queen knows
    When I add the node "box" with a key the node does not accept
    Then the keeper refuses with SSH_AUTH_FAILED and the message "SSH authentication to 127.0.0.1 as"
    And the refusal suggests "chmod 600"
    And only attempt 1/3 was narrated
    And no node is registered

  Scenario: A second node with a name already taken is refused
    Given an SSH node whose host key the queen knows
    And the node "box" is registered with install path "/opt/rbee-first"
    When I add the node "box" again with install path "/opt/rbee-second"
    Then the keeper refuses with NODE_EXISTS and the message "A node named 'box' is already registered"
    And the refusal suggests "rbee-keeper setup update-node --name box"
    And the refusal suggests "rbee-keeper setup remove-node --name box"
    And node "box" still has install path "/opt/rbee-first"

  Scenario: list-nodes shows a table for people and one JSON object per node for scripts
    Given an SSH node whose host key the queen knows
    And the node "alpha" is registered with install path "/opt/rbee-alpha"
    And the node "beta" is registered with install path "/opt/rbee-beta"
    When I list the nodes
    Then the table has the columns NAME, HOST, STATUS, LAST CONNECTED, INSTALL PATH, BACKENDS and HIVE
    And the table has a row for "alpha" and a row for "beta", each reachable, with its install path and the node's user@host:port
    When I list the nodes as JSON
    Then stdout holds one JSON object per node, in name order, each with its name, ssh_host, ssh_port, status, last_connected_unix_ms and install_path

  Scenario: An empty registry lists nothing on stdout
    When I list the nodes
    Then the keeper exits 0
    And stdout is empty and the narration says "No nodes registered"

  Scenario: update-node saves a plain setting at once and tests a changed SSH setting first
    Given an SSH node whose host key the queen knows
    And the node "box" is registered with install path "/opt/rbee-box"
    When I update node "box" with --git-branch "stable"
    Then the keeper exits 0
    And the narration does not say "Testing the new connection"
    And node "box" has git branch "stable"
    When I update node "box" to an SSH port where nothing listens
    Then the keeper refuses with SSH_CONNECTION_FAILED and the message "failed after 3 attempts"
    And node "box" still has the SSH node's port

  Scenario: Removing a node whose hive this queen did not start stops nothing, and says so
    Given an SSH node whose host key the queen knows
    And the node "box" is registered with install path "/opt/rbee-box"
    When I remove node "box"
    Then the keeper exits 0
    And the narration says "Node box removed from the queen's registry"
    And the narration says "Nothing stopped on box: this queen did not start its hive"
    And no node is registered

  Scenario: A node name the queen does not know is refused with the command that adds it
    When I run install, check-node, update-node and remove-node for the unknown node "ghost"
    Then each is refused with NODE_NOT_FOUND and the message "No node named 'ghost' is registered"
    And each refusal suggests "rbee-keeper setup add-node --name ghost"

  Scenario: An unknown host key is refused with its fingerprint, then trusted on request and recorded
    Given an SSH node whose host key the queen does not know
    When I add the node "box" with the keeper
    Then the keeper refuses with SSH_HOST_KEY_UNKNOWN and the message "is not known"
    And the refusal shows the node's host key fingerprint
    And the refusal suggests "--trust-host-key"
    And no node is registered
    When I add the node "box" with the keeper, trusting its host key
    Then the keeper exits 0
    And the narration says the new host key was trusted and recorded
    And the queen's known_hosts file holds the node's key and is readable by its owner only
    When I check node "box" over SSH only
    Then the queen narrated, in order, "box is reachable", "`echo test` returned `test`"
    And the narration does not say "Trusted the new host key"

  Scenario: A changed host key is refused with both fingerprints, trusted or not, and never overwritten
    Given an SSH node whose host key the queen knows
    And the node "box" is registered with install path "/opt/rbee-box"
    When the node starts presenting another host key
    And I check node "box" over SSH only
    Then the keeper refuses with SSH_HOST_KEY_CHANGED and the message "has changed"
    And the refusal shows the recorded fingerprint and the presented one
    When I update node "box" with its SSH port, trusting its host key
    Then the keeper refuses with SSH_HOST_KEY_CHANGED and the message "has changed"
    And the queen's known_hosts file is unchanged
    And node "box" keeps its status with last error "SSH_HOST_KEY_CHANGED"

  Scenario: check-node starts the node's hive over OpenSSH and passes the hive preflight; remove-node stops that hive
    Given OpenSSH's sshd on 127.0.0.1 where rbee is installed, whose host key the queen knows
    And the node "box" is registered with rbee installed
    When I check node "box"
    Then the keeper exits 0
    And the queen narrated, in order, "Starting rbee-hive on box", "rbee-hive started on box (pid", "Hive health: healthy", "Hive version 0.1.0 is compatible", "Backends: cpu (1 device)", "Resources: RAM", "Node box is ready"
    And one hive runs for the node, with its log in the node's RBEE_HOME and its key file readable by its owner only
    And node "box" is listed with its hive up and started by this queen
    When I remove node "box"
    Then the keeper exits 0
    And the narration says the hive this queen had started on "box" was stopped, naming its pid
    And no hive runs for the node

  Scenario: A node registered with TLS gets its hive's certificates over SSH, and its hive speaks only mutual TLS
    Given an SSH node where rbee is installed, whose host key the queen knows
    And the node "box" is registered with rbee installed and TLS
    When I check node "box"
    Then the keeper exits 0
    And the queen narrated, in order, "Issued box's hive certificate", "Starting rbee-hive on box", "Hive health: healthy", "Node box is ready"
    And the node's certificates are in its RBEE_HOME, the keys readable by their owner only
    And the node's hive answers a client of the cluster CA and refuses clear text and strangers
    And node "box" is listed with TLS
    When I remove node "box"
    Then the keeper exits 0
    And no hive runs for the node
