#!/bin/sh
# render-acl.sh SOURCE TARGET: the ACL file redis-server loads, from deploy/redis/users.acl.
#
# Drops comments and blank lines (an ACL file may hold neither) and appends each
# user's password, `>$REDIS_PASSWORD_<USER>` (user name upper-cased), to its line;
# the `default` user (off) gets none. Fails, writing nothing, when a password is
# unset, empty or holds whitespace. TARGET is written with mode 600.
# POSIX sh and awk: runs in the redis:alpine image (busybox) as well as on a host.
set -eu

if [ "$#" -ne 2 ]; then
    echo "usage: render-acl.sh SOURCE TARGET" >&2
    exit 2
fi
source_file=$1
target=$2

umask 077
tmp="$target.tmp.$$"
trap 'rm -f "$tmp"' EXIT
awk '
    /^[ \t]*(#|$)/ { next }
    $1 == "user" && $2 != "default" {
        name = "REDIS_PASSWORD_" toupper($2)
        password = ENVIRON[name]
        if (password == "") {
            print "render-acl: " name " is not set (the password of Redis user " $2 ")" > "/dev/stderr"
            failed = 1
            exit 1
        }
        if (password ~ /[ \t\r\n]/) {
            print "render-acl: " name " holds whitespace; use hex (openssl rand -hex 32)" > "/dev/stderr"
            failed = 1
            exit 1
        }
        print $0 " >" password
        next
    }
    { print }
    END { if (failed) exit 1 }
' "$source_file" >"$tmp"
mv "$tmp" "$target"
trap - EXIT
