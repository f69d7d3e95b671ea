#!/bin/sh
# pytest-kata isolation probe. POSIX sh for busybox (or coreutils): prints ONE JSON object of facts, on one
# line, between two marker lines. Facts only: the harness compares them with the host's view.
# Inputs (environment):
#   KATA_PROBE_TARGETS     "ip:port ip ..."  addresses to try to reach (tcp with a port, icmp without)
#   KATA_PROBE_HOST_PATHS  host paths (markers) whose visibility from inside is reported
#   KATA_PROBE_WRITES=1    also attempt privileged writes (core_pattern, uevent_helper, root device); set only
#                          when the sandbox is known to be a VM
#   KATA_PROBE_MARK        token written by those attempts
#   KATA_PROBE_VOLUME_WRITE  a read-only volume's mount point: try to write it, remount it rw, write again
#   KATA_PROBE_VSOCK_TIMEOUT  seconds per vsock connect attempt (default 3)
#   KATA_PROBE_MEM_FILL    MiB a process tries to hold (a string doubled in awk), to show whether a memory
#                          limit holds
#   KATA_PROBE_CPU_BURN    seconds of busy loops (KATA_PROBE_CPU_WORKERS of them, default 2) whose CPU time is
#                          measured, to show whether a CPU quota holds
# No tabs in this file: the direct driver types it over a serial console.
PATH=/bin:/sbin:/usr/bin:/usr/sbin:$PATH
export PATH
MARK=${KATA_PROBE_MARK:-kata-probe}

have() { command -v "$1" >/dev/null 2>&1; }
esc() { sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' -e 's/\t/\\t/g' | tr -d '\r'; }
jarr() { esc | awk 'BEGIN{printf "["} {if (NR>1) printf ","; printf "\"%s\"", $0} END{printf "]"}'; }
jstr() { printf '%s\n' "$1" | esc | awk 'BEGIN{printf "\""} {if (NR>1) printf "\\n"; printf "%s", $0} END{printf "\""}'; }
jbool() { if "$@" >/dev/null 2>&1; then printf true; else printf false; fi; }
jnum() { case $1 in ''|*[!0-9]*) printf null;; *) printf '%s' "$1";; esac; }
key() { printf ',"%s":' "$1"; }
rd() { cat "$1" 2>/dev/null; }
status() { awk -v k="$1:" '$1==k {print $2; exit}' /proc/self/status 2>/dev/null; }
canwrite() { [ -w "$1" ]; }
errof() { # run "$@", print "ok" or the first error line
  e=$("$@" 2>&1 >/dev/null) && { printf 'ok'; return; }
  printf '%s' "${e:-failed}" | head -n 1
}
pstate() { # absent | masked (empty, unreadable or a char device) | visible
  if [ ! -e "$1" ]; then printf absent; return; fi
  if [ -c "$1" ]; then printf masked; return; fi
  if [ -d "$1" ]; then
    if [ -z "$(ls -A "$1" 2>/dev/null | head -n 1)" ]; then printf masked; else printf visible; fi
    return
  fi
  n=$(dd if="$1" bs=64 count=1 2>/dev/null | wc -c)
  if [ "${n:-0}" -gt 0 ]; then printf visible; else printf masked; fi
}
root_dev() { # the block device backing / (e.g. vda1) and its whole disk, from /sys
  d=$(awk '$2=="/" {print $1}' /proc/self/mounts | tail -n 1)
  d=${d#/dev/}
  [ -e "/sys/class/block/$d" ] && printf '%s' "$d"
}

b=KATA-PROBE
echo "=== ${b}-BEGIN ==="
printf '{"probe":1'
key uid; jnum "$(id -u 2>/dev/null)"
key kernel_release; jstr "$(uname -r)"
key kernel_version; jstr "$(rd /proc/version)"
key boot_id; jstr "$(rd /proc/sys/kernel/random/boot_id)"
key hostname; jstr "$(rd /proc/sys/kernel/hostname)"
key machine_id; jstr "$(rd /etc/machine-id)"
key cmdline; jstr "$(rd /proc/cmdline)"
key hypervisor_flag; jbool grep -qw hypervisor /proc/cpuinfo
key dmi_sys_vendor; jstr "$(rd /sys/class/dmi/id/sys_vendor)"
key processes; for d in /proc/[0-9]*; do echo "${d#/proc/} $(rd "$d/comm")"; done | jarr
key user_processes  # processes with a command line: kernel threads excluded (every kernel has those)
for d in /proc/[0-9]*; do [ "$(head -c 1 "$d/cmdline" 2>/dev/null | wc -c)" -gt 0 ] && rd "$d/comm"; done | sort -u | jarr
key mounts; rd /proc/self/mounts | jarr
key root_writable; jbool sh -c "t=/.kata-probe-w-\$\$; : > \$t && rm -f \$t"
key devices; ls -1A /dev 2>/dev/null | jarr
key block_devices; printf '['; first=1
for s in /sys/class/block/*; do
  [ -e "$s/dev" ] || continue
  [ $first = 1 ] || printf ','; first=0
  printf '{"name":%s,"dev":%s,"ro":%s,"size":%s}' "$(jstr "${s##*/}")" "$(jstr "$(rd "$s/dev")")" \
    "$(jnum "$(rd "$s/ro")")" "$(jnum "$(rd "$s/size")")"
done; printf ']'
key status; printf '{"CapEff":%s,"CapPrm":%s,"CapBnd":%s,"CapAmb":%s,"NoNewPrivs":%s,"Seccomp":%s}' \
  "$(jstr "$(status CapEff)")" "$(jstr "$(status CapPrm)")" "$(jstr "$(status CapBnd)")" \
  "$(jstr "$(status CapAmb)")" "$(jnum "$(status NoNewPrivs)")" "$(jnum "$(status Seccomp)")"
key masked; printf '{'; first=1
for p in /proc/kcore /proc/keys /proc/timer_list /proc/sched_debug /proc/acpi /proc/scsi /sys/firmware \
         /proc/latency_stats /sys/devices/virtual/powercap; do
  [ $first = 1 ] || printf ','; first=0; printf '"%s":"%s"' "$p" "$(pstate "$p")"
done; printf '}'
key writable_paths; printf '{'; first=1
for p in /proc/sys /proc/sys/kernel/core_pattern /proc/sysrq-trigger /proc/irq /proc/bus /sys /sys/fs/cgroup \
         /sys/kernel/uevent_helper; do
  [ $first = 1 ] || printf ','; first=0; printf '"%s":%s' "$p" "$(jbool canwrite "$p")"
done; printf '}'
key core_pattern; jstr "$(rd /proc/sys/kernel/core_pattern)"
key uevent_helper; jstr "$(rd /sys/kernel/uevent_helper)"
key modules_disabled; jnum "$(rd /proc/sys/kernel/modules_disabled)"
key cgroup; rd /proc/self/cgroup | jarr
mem=$(rd /sys/fs/cgroup/memory.max); [ -n "$mem" ] || mem=$(rd /sys/fs/cgroup/memory/memory.limit_in_bytes)
key memory_limit; jstr "$mem"
pids=$(rd /sys/fs/cgroup/pids.max); [ -n "$pids" ] || pids=$(rd /sys/fs/cgroup/pids/pids.max)
key pids_limit; jstr "$pids"
key mem_total_kb; jnum "$(awk '$1=="MemTotal:" {print $2}' /proc/meminfo)"
key cpus; jnum "$(grep -c '^processor' /proc/cpuinfo)"
key interfaces; ls -1 /sys/class/net 2>/dev/null | jarr
key addresses
if have ip; then ip -o addr 2>/dev/null | awk '{print $2, $4}' | jarr; else printf '[]'; fi
key routes; awk 'NR>1 {print $1, $2, $3}' /proc/net/route 2>/dev/null | jarr
key reach; printf '{'; first=1
for t in $KATA_PROBE_TARGETS; do
  [ $first = 1 ] || printf ','; first=0
  host=${t%:*}; port=${t##*:}
  if [ "$host" = "$t" ]; then
    if have ping; then r=$(jbool ping -c 1 -W 2 "$t"); r=$( [ "$r" = true ] && echo reachable || echo unreachable)
    else r="untestable: no ping"; fi
  elif have nc; then
    if timeout 4 nc -w 2 "$host" "$port" </dev/null >/dev/null 2>&1; then r=reachable; else r=unreachable; fi
  else r="untestable: no nc"; fi
  printf '%s:%s' "$(jstr "$t")" "$(jstr "$r")"
done; printf '}'
key vsock_device; jbool test -e /dev/vsock
key vsock; printf '{'; first=1
for cid in 2 1; do for port in 1024 1026; do
  [ $first = 1 ] || printf ','; first=0
  if [ ! -e /dev/vsock ] && ! grep -qi vsock /proc/net/protocols 2>/dev/null; then
    r="unreachable: no AF_VSOCK transport in this kernel/VM"
  elif ls /sys/bus/virtio/devices/*/device >/dev/null 2>&1 && \
       ! grep -qx 0x0013 /sys/bus/virtio/devices/*/device 2>/dev/null; then
    r="unreachable: this VM has no virtio-vsock device"
  elif have socat; then
    e=$(timeout "${KATA_PROBE_VSOCK_TIMEOUT:-3}" socat -u OPEN:/dev/null "VSOCK-CONNECT:$cid:$port" 2>&1) \
      && r=reachable || r="unreachable: ${e##*: }"
  else r="untestable: no socat in the workload (busybox nc has no AF_VSOCK)"; fi
  printf '"%s:%s":%s' "$cid" "$port" "$(jstr "$r")"
done; done; printf '}'
key agent_serial; printf '{'; first=1
for port in /sys/class/virtio-ports/*; do
  [ -e "$port/name" ] || continue
  [ $first = 1 ] || printf ','; first=0
  node=/dev/${port##*/}
  if [ ! -e "$node" ]; then r="unreachable: no $node in the workload"
  elif e=$(errof sh -c ": >> $node"); [ "$e" = ok ]; then r=reachable
  else r="unreachable: $e"; fi
  printf '%s:%s' "$(jstr "$(cat "$port/name")")" "$(jstr "$r")"
done; printf '}'
key host_paths; printf '{'; first=1
for p in $KATA_PROBE_HOST_PATHS; do
  [ $first = 1 ] || printf ','; first=0; printf '%s:%s' "$(jstr "$p")" "$(jbool test -e "$p")"
done; printf '}'
key sockets; for s in /run/containerd/containerd.sock /var/run/docker.sock /run/crio/crio.sock \
    /run/vc /run/kata-containers /var/run/libvirt/libvirt-sock; do [ -e "$s" ] && echo "$s"; done | jarr
key fds; for f in /proc/$$/fd/*; do echo "${f##*/} $(readlink "$f" 2>/dev/null)"; done | jarr
key cwd; jstr "$(readlink /proc/self/cwd 2>/dev/null)"
key proc_self_exe_write; jstr "$(errof sh -c ': >> /proc/self/exe')"
rdev=$(root_dev)
key root_device; jstr "$rdev"
# the kernel's root block device (root= on its command line), else the first whole disk: a device node is made
# for it (CAP_MKNOD) and opened for reading, which the device cgroup of a container must refuse
rparam=$(tr ' ' '\n' < /proc/cmdline 2>/dev/null | sed -n 's/^root=//p' | tail -n 1)
key root_param; jstr "$rparam"
# the first whole disk (not a partition, loop, ram or optical device), or nothing
first_disk() {
  for s in /sys/class/block/*; do
    [ -e "$s/dev" ] || continue
    [ -e "$s/partition" ] && continue
    case ${s##*/} in loop*|ram*|zram*|sr*) continue;; esac
    echo "${s##*/}"; return
  done
}
rblk=${rparam#/dev/}; rsrc=root=
if [ "$rblk" = "$rparam" ] || [ ! -e "/sys/class/block/$rblk/dev" ]; then
  rblk=$(first_disk); rsrc="first disk"
fi
key mknod_root; printf '{"device":%s,"source":%s' "$(jstr "$rblk")" "$(jstr "$rsrc")"
if [ -n "$rblk" ]; then
  mm=$(rd "/sys/class/block/$rblk/dev")
  printf ',"dev":%s,"size":%s' "$(jstr "$mm")" "$(jnum "$(rd "/sys/class/block/$rblk/size")")"
  node=/dev/.kata-probe-root-$$
  rm -f "$node"
  printf ',"mknod":%s' "$(jstr "$(errof mknod "$node" b "${mm%:*}" "${mm#*:}")")"
  if [ -b "$node" ]; then
    printf ',"open_read":%s' "$(jstr "$(errof dd if="$node" of=/dev/null bs=512 count=1)")"
  fi
  rm -f "$node"
fi
printf '}'
if [ "$KATA_PROBE_WRITES" = 1 ]; then
  key writes; printf '{'
  old=$(rd /proc/sys/kernel/core_pattern)
  printf '"core_pattern":%s' "$(jstr "$(errof sh -c "echo '|/kata-escape-$MARK' > /proc/sys/kernel/core_pattern")")"
  printf ',"core_pattern_after":%s' "$(jstr "$(rd /proc/sys/kernel/core_pattern)")"
  [ -n "$old" ] && { echo "$old" > /proc/sys/kernel/core_pattern; } 2>/dev/null
  printf ',"uevent_helper":%s' "$(jstr "$(errof sh -c "echo /kata-escape-$MARK > /sys/kernel/uevent_helper")")"
  { echo > /sys/kernel/uevent_helper; } 2>/dev/null
  disk=$(first_disk)
  if [ -n "$rdev" ] && [ -e "/sys/class/block/$rdev/partition" ]; then
    disk=$(basename "$(dirname "$(readlink -f "/sys/class/block/$rdev")")")
  fi
  printf ',"disk":%s' "$(jstr "$disk")"
  if [ -n "$disk" ]; then
    mm=$(rd "/sys/class/block/$disk/dev"); maj=${mm%:*}; min=${mm#*:}
    node=/dev/.kata-probe-$MARK
    rm -f "$node"
    printf ',"mknod":%s' "$(jstr "$(errof mknod "$node" b "$maj" "$min")")"
    printf ',"open_write":%s' "$(jstr "$(errof dd if=/dev/null of="$node" bs=512 count=0 conv=notrunc)")"
    sz=$(rd "/sys/class/block/$disk/size")
    seek=$(( ${sz:-16} - 8 ))
    printf ',"disk_write":%s' "$(jstr "$(errof sh -c "printf 'KATA-ESCAPE-$MARK' | dd of=$node bs=512 seek=$seek conv=notrunc,fsync")")"
    rm -f "$node"
  fi
  printf ',"remount_rw":%s' "$(jstr "$(errof mount -o remount,rw /)")"
  printf ',"root_file_write":%s' "$(jstr "$(errof sh -c "echo $MARK > /.kata-escape-$MARK && sync")")"
  printf '}'
fi
if [ -n "$KATA_PROBE_VOLUME_WRITE" ]; then
  v=$KATA_PROBE_VOLUME_WRITE
  key volume_write; printf '{'
  printf '"mount":%s' "$(jstr "$(awk -v m="$v" '$2==m' /proc/self/mounts | tail -n 1)")"
  printf ',"write":%s' "$(jstr "$(errof sh -c "echo $MARK >> $v/keep")")"
  printf ',"remount_rw":%s' "$(jstr "$(errof mount -o remount,rw,bind "$v")")"
  printf ',"write_after_remount":%s' "$(jstr "$(errof sh -c "echo $MARK >> $v/keep && : > $v/planted-$MARK && sync")")"
  printf '}'
fi
if [ -n "$KATA_PROBE_CPU_BURN" ]; then
  n=${KATA_PROBE_CPU_WORKERS:-2}
  cmax=$(rd /sys/fs/cgroup/cpu.max)
  for d in /sys/fs/cgroup/cpu /sys/fs/cgroup/cpu,cpuacct; do
    [ -z "$cmax" ] && [ -e "$d/cpu.cfs_quota_us" ] && cmax="$(rd "$d/cpu.cfs_quota_us") $(rd "$d/cpu.cfs_period_us")"
  done
  t0=$(awk '{print $1}' /proc/uptime)
  bpids=""
  i=0
  while [ $i -lt "$n" ]; do sh -c 'while :; do :; done' & bpids="$bpids $!"; i=$((i + 1)); done
  sleep "$KATA_PROBE_CPU_BURN"
  ticks=0
  for p in $bpids; do t=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null); ticks=$((ticks + ${t:-0})); done
  t1=$(awk '{print $1}' /proc/uptime)
  kill $bpids 2>/dev/null; wait 2>/dev/null
  key cpu_burn
  printf '{"workers":%s,"seconds":%s,"ticks":%s,"hz":100,"uptime_before":%s,"uptime_after":%s,"cpu_max":%s,"cpus":%s}' \
    "$(jnum "$n")" "$(jnum "$KATA_PROBE_CPU_BURN")" "$(jnum "$ticks")" "$(jstr "$t0")" "$(jstr "$t1")" \
    "$(jstr "$cmax")" "$(jnum "$(grep -c '^processor' /proc/cpuinfo)")"
fi
if [ -n "$KATA_PROBE_MEM_FILL" ]; then
  mlim=$(rd /sys/fs/cgroup/memory.max)
  [ -n "$mlim" ] || mlim=$(rd /sys/fs/cgroup/memory/memory.limit_in_bytes)
  f=/tmp/.kata-probe-mem-$$
  awk -v want="$KATA_PROBE_MEM_FILL" -v f="$f" 'BEGIN { s = "x"; while (length(s) < want * 1048576) \
    { s = s s; print length(s) > f; close(f) }; print length(s) > f; print "held" > f; close(f) }' 2>/dev/null
  rc=$?
  key mem_fill
  printf '{"asked_mb":%s,"rc":%s,"reached_bytes":%s,"held":%s,"limit":%s}' "$(jnum "$KATA_PROBE_MEM_FILL")" \
    "$(jnum "$rc")" "$(jnum "$(grep -v held "$f" 2>/dev/null | tail -n 1)")" "$(jbool grep -qx held "$f")" \
    "$(jstr "$mlim")"
  rm -f "$f"
fi
printf '}\n'
echo "=== ${b}-END ==="
