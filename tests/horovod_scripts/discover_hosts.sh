#!/bin/sh
# Horovod Elastic host discovery for the elastic test: the hosts line is whatever the training wrote last.
cat "$SCALING_PLUGINS_HOSTS_FILE"
