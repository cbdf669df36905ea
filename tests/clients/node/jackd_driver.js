// Drives jackd (npm) through the operations named on the command line (see common.js):
//   node jackd_driver.js PORT OP[:ARG]...
'use strict';
const Jackd = require('jackd');
const { main, jobArgs, NotAvailable, USE_FIRST } = require('./common');

main({
  async open(port) {
    const c = new Jackd();
    await c.connect({ host: '127.0.0.1', port });
    return c;
  },
  async op(c, name, arg) {
    const { tube, id } = jobArgs(arg);
    if (arg && USE_FIRST.includes(name)) await c.use(arg);
    if (arg && ['reserve', 'reserve-with-timeout'].includes(name)) {
      await c.watch(arg);
      await c.ignore('default');
    }
    switch (name) {
      case 'use': return c.use(tube);
      case 'watch': return c.watch(tube);
      case 'ignore': return c.ignore(arg || 'default');
      case 'put': return c.put('x');
      case 'reserve': return c.reserve();
      case 'reserve-with-timeout': return c.reserveWithTimeout(0);
      case 'delete': return c.delete(id);
      case 'release': return c.release(id);
      case 'bury': return c.bury(id);
      case 'touch': return c.touch(id);
      case 'kick': return c.kick(1);
      case 'kick-job': return c.kickJob(id);
      case 'peek': return c.peek(id);
      case 'peek-ready': return c.peekReady();
      case 'peek-buried': return c.peekBuried();
      case 'stats-job': return c.statsJob(id);
      case 'stats-tube': return c.statsTube(tube);
      case 'pause-tube': return c.pauseTube(tube, { delay: 0 });
      case 'peek-delayed': return c.peekDelayed();
      case 'list-tubes': return c.listTubes();
      case 'reserve-job': return c.reserveJob(id);
      default: throw new Error(`unknown op ${name}`);
    }
  },
  async stats(c) {
    const yaml = await c.stats();
    const field = (k) => (yaml.match(new RegExp(`^${k}: (\\S+)`, 'm')) || [])[1];
    return { pid: field('pid'), uptime: field('uptime') };
  },
  close: (c) => { c.quit(); },
});
