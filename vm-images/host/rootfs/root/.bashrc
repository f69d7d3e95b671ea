# pytest-kata host: a plain root shell on ttyS0 that the harness drives (pytest_kata/hosts/libvirt.py).
# No echo and no line editing, so that the harness reads only what commands print; no pagers or colours.
export TERM=dumb HISTFILE=/dev/null PAGER=cat SYSTEMD_PAGER= SYSTEMD_COLORS=0 LANG=C.UTF-8
if [ "$(tty)" = /dev/ttyS0 ]; then
  set +o emacs +o vi
  stty -echo -onlcr 2>/dev/null
  dmesg -n 1 2>/dev/null   # kernel chatter off the shell's console (panics still print; dmesg keeps all)
fi
PS1='kt-host# '
