// Stylesheets are bundled as text and put in a <style> element (main.tsx).
declare module "*.css" {
  const text: string;
  export default text;
}
