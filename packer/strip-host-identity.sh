#!/bin/sh
# Run on the machine being imaged, last: what makes it one host rather than an image goes. A
# machine booted from the image makes its own (systemd a machine-id, sshd its host keys, the
# node its data on first start).
set -eu
systemctl stop anthill 2>/dev/null || true
rm -rf /var/lib/anthill/* /etc/anthill/node.yaml /etc/anthill/consul-token
rm -f /etc/ssh/ssh_host_*
: >/etc/machine-id
rm -f /var/lib/dbus/machine-id
rm -rf /var/log/journal/*
rm -f /var/lib/systemd/random-seed
# cloud-init runs again on the first boot of a machine made from the image (with its own user
# data), and the builder's temporary SSH keys go: the machine gets the keys its cloud gives it.
rm -rf /var/lib/cloud /var/log/cloud-init.log /var/log/cloud-init-output.log
rm -f /root/.ssh/authorized_keys /home/*/.ssh/authorized_keys
rm -f /root/.bash_history /home/*/.bash_history
