// Drives fivebeans (npm) through the operations named on the command line (see common.js):
//   node fivebeans_driver.js PORT OP[:ARG]...
'use strict';
const fivebeans = require('fivebeans');
const { main, jobArgs, NotAvailable, USE_FIRST } = require('./common');

function call(c, method, ...args) {
  return new Promise((resolve, reject) => {
    c[method](...args, (err, ...rest) => (err ? reject(err) : resolve(rest)));
  });
}

main({
  open: (port) => new Promise((resolve, reject) => {
    const c = new fivebeans.client('127.0.0.1', port);
    c.on('connect', () => resolve(c)).on('error', reject);
    c.connect();
  }),
  async op(c, name, arg) {
    const { tube, id } = jobArgs(arg);
    if (arg && USE_FIRST.includes(name)) await call(c, 'use', arg);
    if (arg && ['reserve', 'reserve-with-timeout'].includes(name)) {
      await call(c, 'watch', arg);
      await call(c, 'ignore', 'default');
    }
    switch (name) {
      case 'use': return call(c, 'use', tube);
      case 'watch': return call(c, 'watch', tube);
      case 'ignore': return call(c, 'ignore', arg || 'default');
      case 'put': return call(c, 'put', 0, 0, 60, 'x');
      case 'reserve': return call(c, 'reserve');
      case 'reserve-with-timeout': return call(c, 'reserve_with_timeout', 0);
      case 'delete': return call(c, 'destroy', id);
      case 'release': return call(c, 'release', id, 0, 0);
      case 'bury': return call(c, 'bury', id, 0);
      case 'touch': return call(c, 'touch', id);
      case 'kick': return call(c, 'kick', 1);
      case 'kick-job': return call(c, 'kick_job', id);
      case 'peek': return call(c, 'peek', id);
      case 'peek-ready': return call(c, 'peek_ready');
      case 'peek-buried': return call(c, 'peek_buried');
      case 'stats-job': return call(c, 'stats_job', id);
      case 'stats-tube': return call(c, 'stats_tube', tube);
      case 'pause-tube': return call(c, 'pause_tube', tube, 0);
      case 'peek-delayed': return call(c, 'peek_delayed');
      case 'list-tubes': return call(c, 'list_tubes');
      case 'reserve-job': throw new NotAvailable(name);
      default: throw new Error(`unknown op ${name}`);
    }
  },
  async stats(c) {
    const [s] = await call(c, 'stats');
    return s;
  },
  close: (c) => c.end(),
});
